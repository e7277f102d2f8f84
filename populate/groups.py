"""Several keys of one table computed together: which keys go together, and filling a table group by group.

A table that can compute several keys at once (``TrainedNetwork``: networks trained as one fused model,
``models/vision/group.py``; the noise, corruption and minimal-perturbation scores of networks of one
architecture, ``models/robustness/group.py``) says so with three members: ``group_key(key)`` (keys with
equal group keys may share a group), ``group_limit(key, runtime)`` (how many at most, on this worker's device) and
``make_group(keys, on_outcome)`` (computes them, storing each key's rows in its own transaction, and
reports each key's outcome as it comes). The group size is an execution setting (``NEUREG_GROUP``,
``--group``): the rows stored are the same whatever it is, so it never enters a config hash.

``populate_in_groups`` is ``populate()`` for such a table: with ``reserve_jobs`` every key of a group is
reserved through DataJoint's jobs API before the group starts and completed or failed on its own as its
outcome comes, so workers and ``neureg populate --reserve-jobs`` share the queue key by key.
"""

from __future__ import annotations

import logging
import time
import traceback

from .worker_jobs import ERROR_MESSAGE_LENGTH, release, tag_message

logger = logging.getLogger("neureg")


def groupable(table) -> bool:
    """Whether ``table`` computes several keys at once (module notes)."""
    return all(hasattr(table, name) for name in ("group_key", "group_limit", "make_group"))


def key_groups(table, keys: list[dict], runtime) -> list[list[dict]]:
    """``keys`` in groups that may run together: one group key each, at most its group limit, in the order
    the keys came (so a heaviest-first order is kept)."""
    by_group: dict[tuple, list[dict]] = {}
    for key in keys:
        by_group.setdefault(table.group_key(key), []).append(key)
    groups = []
    for members in by_group.values():
        limit = max(1, int(table.group_limit(members[0], runtime)))
        groups += [members[i : i + limit] for i in range(0, len(members), limit)]
    return groups


def batches(table, keys: list[dict], group: str | int | None = None) -> list[list[dict]]:
    """A worker's pending keys one at a time, or, for a groupable table, in its groups; ``group`` is the
    worker's ``--group`` (None: ``NEUREG_GROUP``, else automatic)."""
    from ..models.runtime import Runtime, group_from_text

    if not groupable(table):
        return [[key] for key in keys]
    overrides = {} if group is None else {"group": group_from_text(str(group), "--group")}
    return key_groups(table, keys, Runtime.from_env(**overrides))


def pending_groups(table, restriction, runtime) -> list[list[dict]]:
    """The keys ``populate`` would compute (key source, restricted, less what is stored), grouped."""
    todo = table.key_source
    for condition in restriction:
        todo = todo & condition
    keys = (todo - table().proj()).proj().to_dicts(order_by="KEY")
    return key_groups(table, [dict(k) for k in keys], runtime)


class GroupLedger:
    """Each key's outcome as ``make_group`` reports it: counted, logged, and told to the jobs table. A
    worker passes each key's ``attempt`` number (by job key) and its ``attempts``: failures are then
    tagged as the worker's one-key jobs are (``worker_jobs.tag_message``)."""

    def __init__(self, table, jobs=None, attempt: dict | None = None, attempts: int = 1):
        self.name, self.jobs, self.attempt, self.attempts = table.__name__, jobs, attempt, attempts
        self.done, self.errors, self.first, self.settled = 0, [], None, []
        self.started = time.perf_counter()

    def __call__(self, key: dict, error: Exception | None) -> None:
        self.settled.append(key)
        described = " ".join(f"{k}={v}" for k, v in key.items())
        if error is None:
            self.done += 1
            if self.jobs is not None:
                self.jobs.complete(key, duration=time.perf_counter() - self.started)
            logger.info("done %s %s", self.name, described)
            return
        message = f"{type(error).__name__}: {error}"
        if self.attempt is not None:
            number = self.attempt[tuple(key[k] for k in self.jobs.primary_key)]
            message = tag_message(message, number, self.attempts)
        self.errors.append((key, message))
        self.first = self.first or error
        logger.error("failed %s %s: %s", self.name, described, message)
        if self.jobs is not None:
            stack = "".join(traceback.format_exception(error))
            self.jobs.error(key, error_message=message[:ERROR_MESSAGE_LENGTH], error_stack=stack)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def unsettled(self, keys: list[dict]) -> list[dict]:
        """The keys of the group that have no outcome yet (after a stop or a crash)."""
        return [key for key in keys if key not in self.settled]


def populate_in_groups(table, groups: list[list[dict]], *, reserve_jobs=False, suppress_errors=False) -> dict:
    """``populate`` a groupable table group by group (``groups``: its ``pending_groups``); returns
    ``{"success_count", "error_list"}`` as DataJoint's populate does (``error_list``: (key, "Type: message")
    pairs, with ``suppress_errors``). Without ``suppress_errors`` the first failure is raised once its group
    has finished: the group's other members are stored first."""
    instance = table()
    jobs = instance.jobs if reserve_jobs else None
    if jobs is not None:
        jobs.refresh(delay=-1)
    done, errors = 0, []
    for number, keys in enumerate(groups, 1):
        if jobs is not None:
            keys = [key for key in keys if jobs.reserve(key)]  # another process may hold some
            if not keys:
                continue
        logger.info("%s: group %d of %d, %d key(s)", table.__name__, number, len(groups), len(keys))
        ledger = GroupLedger(table, jobs)
        try:
            instance.make_group(keys, on_outcome=ledger)
        except BaseException:
            for key in ledger.unsettled(keys) if jobs is not None else ():
                release(jobs, key)  # back to pending: each resumes from its checkpoint
            raise
        done, errors = done + ledger.done, errors + ledger.errors
        if ledger.first is not None and not suppress_errors:
            raise ledger.first
    return {"success_count": done, "error_list": errors}
