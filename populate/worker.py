"""`neureg worker`: fill the pipeline's computed tables alongside any number of other workers.

A worker sweeps the computed tables in dependency order (``stages.stage_tables``, read from DataJoint's
graph: the same tables and order as ``neureg populate`` and ``neureg status``). For each table it refreshes
the table's jobs (new keys become pending, so scans ingested while it runs are picked up at the next
sweep; a job whose worker was not seen for ``orphan_timeout`` becomes a failed attempt, "worker died"),
resets failed jobs that have
attempts left (``worker_jobs.retry_failed``: 1 + max_retries attempts, waiting retry_delay * 2**(n-1)
seconds after the n-th failure), then works through the pending keys one at a time:

    jobs.reserve(key)  ->  table.populate(key, max_calls=1)  ->  jobs.complete(key) / jobs.error(key)

The reservation is an atomic UPDATE on the jobs table, so each key is computed by exactly one worker.
The worker reserves the key itself and runs ``populate`` in direct mode restricted to it, rather than
``populate(reserve_jobs=True)``: it knows which job it holds (for the log, the heartbeat and the attempt
count), and DataJoint's own SIGTERM handler, which turns a stop into a failed job, is not in the way.
``make`` runs in one transaction, so an interrupted or killed job leaves no rows.

Stopping: SIGTERM or SIGINT interrupts the current job at once (its transaction rolls back), puts it back
to pending without counting an attempt, and exits 0. Releasing rather than finishing keeps a stop within
a container's grace period whatever the job; a worker killed outright is covered by the heartbeat.
``--time-limit`` does the same when its time is up (a SIGALRM at the deadline): a SLURM array task takes
jobs until then, puts back the one it is in, and exits 0 before the scheduler kills it; a training job
resumes from its last epoch's checkpoint wherever it runs next (``NEUREG_CHECKPOINTS``).

Lost connections (a database restart): the worker backs off (0.5 s doubling to 30 s), reconnects, releases
whatever it held, and goes on. ``--once`` makes one sweep (exit 1 if a job failed), for cron and tests.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import datajoint as dj
from datajoint.errors import DuplicateError, LostConnectionError

from ..database.connect import ensure_embedded_server
from ..errors import denied_by_server
from ..models.runtime import group_from_text
from .groups import GroupLedger, batches
from .heartbeat import Heartbeat
from .stages import pipeline_tables, stage_tables
from .worker_jobs import HOST, attempts_recorded, job_key, reclaim_dead, release, retry_failed, tag_message

logger = logging.getLogger("neureg")


@dataclass
class WorkerOptions:
    """What `neureg worker` was asked to do; checked here so a bad value fails before connecting."""

    stages: list[str] | None = None  # None: every stage
    tables: list[str] | None = None  # class names (OracleStats) or stage.Class; None: every table of the stages
    once: bool = False
    idle_sleep: float = 30.0
    time_limit: float | None = None
    orphan_timeout: int = 300
    max_retries: int = 2
    retry_delay: int = 300
    group: str | None = None  # --group: networks trained as one fused model (NEUREG_GROUP; None: the environment)

    def __post_init__(self):
        if self.orphan_timeout < 1:
            raise ValueError("--orphan-timeout must be at least 1 second")
        if self.max_retries < 0 or self.retry_delay < 0 or self.idle_sleep < 0:
            raise ValueError("--max-retries, --retry-delay and --idle-sleep cannot be negative")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError("--time-limit must be positive")
        if self.group is not None:
            group_from_text(str(self.group), "--group")


class WorkerStop(SystemExit):
    """Raised by the signal handler inside a running job: unwinds ``make`` (DataJoint re-raises SystemExit)."""


def select_tables(pipeline, stages=None, tables=None) -> list:
    """The computed tables to work on, upstream first; ValueError names what is unknown and what exists."""
    chosen = stage_tables(pipeline, stages)
    if not tables:
        return chosen
    names = {}
    for entry in pipeline_tables(pipeline):
        if entry.table in chosen:
            names[entry.table.__name__] = names[entry.name] = entry.table
    unknown = [t for t in tables if t not in names]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; computed tables: {sorted(n for n in names if '.' in n)}")
    wanted = {names[t] for t in tables}
    return [t for t in chosen if t in wanted]


def _describe(key: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in key.items())


class Worker:
    """One worker process's loop over the computed tables (see the module notes)."""

    def __init__(self, pipeline, options: WorkerOptions | None = None):
        self.pipeline = pipeline
        self.options = options or WorkerOptions()
        self.tables = select_tables(pipeline, self.options.stages, self.options.tables)
        self.connection = self.tables[0].connection if self.tables else dj.conn()
        self.done = self.failed = 0
        self._stop = threading.Event()
        self._in_job = False
        self._deadline = None
        self._instances = {}
        self._progress = {}
        self._heartbeat = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Sweep until stopped (or once); 0 on a clean stop, 1 if ``--once`` saw a job fail."""
        if self.options.time_limit:
            self._deadline = time.monotonic() + self.options.time_limit
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            if self.options.time_limit:  # the deadline interrupts a running job too, as the scheduler would
                handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_signal)
                signal.setitimer(signal.ITIMER_REAL, self.options.time_limit)
        self._heartbeat = Heartbeat(self.connection, interval=max(0.2, self.options.orphan_timeout / 4))
        self._heartbeat.start()
        try:
            with dj.config.override(jobs__keep_completed=True):  # success rows: who computed what, how long
                return self._loop()
        finally:
            if signal.SIGALRM in handlers:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self._heartbeat.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        started = False
        while not self._stopping():
            try:
                if not started:
                    self._start()
                    started = True
                worked = self._sweep()
            except Exception as exc:
                if self._stop.is_set():
                    break
                if denied_by_server(exc):  # this account may not compute: retrying cannot help
                    raise
                if isinstance(exc, LostConnectionError) or not self._alive():
                    self._reconnect(exc)
                    continue
                logger.exception("worker: unexpected error: %s", exc)
                if self.options.once:
                    return 1
                self._sleep(self.options.idle_sleep)
                continue
            if self.options.once:
                break
            if not worked:
                self._sleep(self.options.idle_sleep)
        logger.info("worker: stopped: %d job(s) done, %d failed", self.done, self.failed)
        return 1 if self.options.once and self.failed else 0

    def _start(self) -> None:
        o = self.options
        logger.info(
            "worker %s pid %d: %d table(s) [%s]; orphan timeout %d s, %d retries (first after %d s)%s",
            HOST,
            os.getpid(),
            len(self.tables),
            ", ".join(t.__name__ for t in self.tables),
            o.orphan_timeout,
            o.max_retries,
            o.retry_delay,
            ", one sweep" if o.once else "",
        )
        for table in stage_tables(self.pipeline):  # declares every jobs table, so `neureg status` works for all
            self._instance(table)
        self._release_own("left over by an earlier process with this host name and pid")

    def _sweep(self) -> bool:
        worked = False
        for table in self.tables:
            if self._stopping():
                break
            instance = self._instance(table)
            self._refresh(instance.jobs)
            self._retry(table, instance.jobs)
            self._report_progress(table, instance.jobs)
            worked |= self._work_on(table, instance)
        return worked

    def _work_on(self, table, instance) -> bool:
        """Run every pending key of one table, re-reading the queue until it offers nothing new."""
        jobs, tried, start, counts = instance.jobs, set(), time.perf_counter(), {"done": 0, "failed": 0}
        while not self._stopping():
            due = jobs.pending & "scheduled_time <= CURRENT_TIMESTAMP(3)"
            columns = due.proj("error_message", "priority", "scheduled_time")
            ready = columns.to_dicts(order_by=["priority", "scheduled_time"])
            rows = [r for r in ready if _frozen(jobs, r) not in tried]
            if not rows:
                break
            messages = {_frozen(jobs, row): row["error_message"] for row in rows}
            for keys in batches(table, [job_key(jobs, row) for row in rows], self.options.group):
                if self._stopping():
                    break
                tried.update(_frozen(jobs, key) for key in keys)
                if len(keys) == 1:
                    outcomes = [self._run_job(table, instance, keys[0], messages[_frozen(jobs, keys[0])])]
                else:
                    outcomes = self._run_group(table, instance, keys, messages)
                for outcome in outcomes:
                    if outcome in counts:
                        counts[outcome] += 1
        if counts["done"] or counts["failed"]:
            logger.info(
                "%s: %d done, %d failed by this worker in %.1f s",
                table.__name__,
                counts["done"],
                counts["failed"],
                time.perf_counter() - start,
            )
        return bool(counts["done"] or counts["failed"])

    # ------------------------------------------------------------------ one job
    def _run_job(self, table, instance, key: dict, previous_message: str) -> str:
        jobs, name = instance.jobs, table.__name__
        attempt, attempts = attempts_recorded(previous_message, "pending") + 1, 1 + self.options.max_retries
        if not jobs.reserve(key):
            return "taken"  # another worker was quicker
        logger.info("start %s %s (attempt %d of %d)", name, _describe(key), attempt, attempts)
        self._heartbeat.watch(jobs, key, f"{name} {_describe(key)}")
        start = time.perf_counter()
        try:
            self._in_job = True
            if self._stop.is_set():
                raise WorkerStop("stop requested")
            result = instance.populate(key, max_calls=1, suppress_errors=True, return_exception_objects=True)
        except BaseException as exc:
            self._in_job = False
            if not (isinstance(exc, SystemExit) or self._stop.is_set()):
                raise  # the database, not the job: the loop reconnects and releases what this process holds
            # A stop. (Rolling back after an interrupted read can itself fail: any error counts as the stop.)
            self._stop.set()
            self._release_interrupted(name, jobs, [key], {_frozen(jobs, key): previous_message})
            return "interrupted"
        finally:
            self._in_job = False
            self._heartbeat.clear()
        seconds = time.perf_counter() - start
        if result["error_list"]:
            error = result["error_list"][0][1]
            if isinstance(error, LostConnectionError):  # the server went away, not the job: no attempt spent
                logger.warning("lost the database connection during %s %s; releasing it", name, _describe(key))
                release(jobs, key, previous_message)
                return "interrupted"
            message = tag_message(f"{type(error).__name__}: {error}", attempt, attempts)
            jobs.error(key, error_message=message, error_stack="".join(traceback.format_exception(error)))
            self.failed += 1
            if attempt < attempts:
                then = f"retry after {self.options.retry_delay * 2 ** (attempt - 1)} s"
            else:
                then = "no attempts left: delete its job row to run it again"
            logger.error(
                "failed %s %s after %.1f s (attempt %d of %d; %s): %s",
                name,
                _describe(key),
                seconds,
                attempt,
                attempts,
                then,
                message.split("] ", 1)[-1],
            )
            return "failed"
        if result["success_count"] or len(instance & key):
            jobs.complete(key, duration=seconds)
            self.done += result["success_count"]
            logger.info("done %s %s in %.1f s", name, _describe(key), seconds)
            return "done" if result["success_count"] else "already"
        (jobs & key).delete_quick()  # its upstream rows are gone; refresh adds it again if they come back
        logger.warning("dropped %s %s: no longer in its key source", name, _describe(key))
        return "dropped"

    def _run_group(self, table, instance, keys: list[dict], messages: dict) -> list[str]:
        """Reserve each key of a group, compute them together (``groups.py``), and complete or fail each key
        as its outcome comes. A stop puts every key without an outcome back to pending (each resumes from
        its checkpoint); a key's failure counts an attempt for that key alone."""
        jobs, name = instance.jobs, table.__name__
        keys = [key for key in keys if jobs.reserve(key)]
        if not keys:
            return ["taken"]
        attempt = {_frozen(jobs, k): attempts_recorded(messages.get(_frozen(jobs, k)), "pending") + 1 for k in keys}
        ledger = GroupLedger(table, jobs, attempt, 1 + self.options.max_retries)
        label = f"{name} group of {len(keys)}"
        logger.info("start %s: %s", label, "; ".join(_describe(k) for k in keys))
        self._heartbeat.watch(jobs, keys, label)
        try:
            self._in_job = True
            if self._stop.is_set():
                raise WorkerStop("stop requested")
            instance.make_group(keys, on_outcome=ledger)
        except BaseException as exc:
            self._in_job = False
            if not (isinstance(exc, SystemExit) or self._stop.is_set()):
                for key in ledger.unsettled(keys):
                    release(jobs, key, messages.get(_frozen(jobs, key)) or "")
                raise
            self._stop.set()
            self._release_interrupted(name, jobs, ledger.unsettled(keys), messages)
            return ["interrupted"]
        finally:
            self._in_job = False
            self._heartbeat.clear()
            self.done, self.failed = self.done + ledger.done, self.failed + len(ledger.errors)
        logger.info("%s: %d stored, %d failed in %.1f s", label, ledger.done, len(ledger.errors), ledger.seconds)
        return ["done"] * ledger.done + ["failed"] * len(ledger.errors)

    def _release_interrupted(self, name, jobs, keys: list[dict], messages: dict) -> None:
        """After a stop inside a job (or a group): fresh connection (the old one may be mid-packet), then
        release the jobs, each with its previous message."""
        try:
            self.connection.close()
            self.connection.connect()
            self.connection.cancel_transaction()
            for key in keys:
                release(jobs, key, messages.get(_frozen(jobs, key)) or "")
                logger.info("released %s %s back to pending", name, _describe(key))
        except Exception as exc:
            logger.error("could not release %s (%s); it is reclaimed after the orphan timeout", name, exc)

    # ------------------------------------------------------------------ per-table housekeeping
    def _refresh(self, jobs) -> None:
        """New keys in, and orphans out: a reservation whose worker stopped beating becomes a failed attempt
        (``reclaim_dead``), not DataJoint's reclaim (``refresh(orphan_timeout=...)``), which would forget
        the job's attempts. So DataJoint's refresh is asked only for new and vanished keys."""
        for key, deaths in reclaim_dead(jobs, self.options.orphan_timeout, 1 + self.options.max_retries):
            logger.warning(
                "%s %s: its worker stopped beating for %d s (died %d time(s) on it); counted as a failed attempt",
                jobs.target.__class__.__name__,
                _describe(key),
                self.options.orphan_timeout,
                deaths,
            )
        try:
            jobs.refresh(delay=-1)
        except DuplicateError:  # another worker refreshed the same rows at the same moment
            return

    def _retry(self, table, jobs) -> None:
        for key, used, message in retry_failed(jobs, self.options.max_retries, self.options.retry_delay):
            what = f"attempt {used + 1} of {1 + self.options.max_retries}" if used else "interrupted earlier"
            logger.info("retry %s %s (%s) after: %s", table.__name__, _describe(key), what, message or "-")

    def _report_progress(self, table, jobs) -> None:
        counts = jobs.progress()
        state = tuple(counts[k] for k in ("pending", "reserved", "success", "error", "ignore"))
        if state != self._progress.get(table):
            self._progress[table] = state
            logger.info("%s: %d pending, %d reserved, %d done, %d failed, %d ignored", table.__name__, *state)

    def _release_own(self, why: str) -> None:
        for table in self.tables:
            count = release(self._instance(table).jobs)
            if count:
                logger.warning("%s: released %d job(s) %s", table.__name__, count, why)

    # ------------------------------------------------------------------ connection, signals, time
    def _reconnect(self, exc: Exception) -> None:
        logger.warning(
            "worker: lost the database connection (%s: %s); reconnecting", type(exc).__name__, _one_line(exc)
        )
        delay, since = 0.5, time.monotonic()
        while not self._stopping():
            self._sleep(delay)
            try:
                ensure_embedded_server()  # a killed embedded server is started again; a lab server is waited for
                self.connection.connect()
                self.connection.cancel_transaction()
                self._release_own("that were running when the connection was lost")
            except Exception as err:
                delay = min(2 * delay, 30.0)
                logger.warning("worker: database unreachable (%s); next try in %.0f s", _one_line(err), delay)
                continue
            logger.info("worker: reconnected after %.1f s", time.monotonic() - since)
            return

    def _alive(self) -> bool:
        """Whether the connection answers. (DataJoint 2.3.5's ``is_connected`` is True even for a dead one:
        the adapters' ``ping`` returns False instead of raising, and ``Connection.ping`` ignores it.)"""
        try:
            self.connection.query("SELECT 1", reconnect=False)
            return True
        except Exception:
            return False

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGALRM:
            name = f"time limit of {self.options.time_limit:.0f} s reached"
        self._stop.set()
        if self._in_job:
            self._in_job = False
            logger.warning("worker: %s: interrupting the current job; it goes back to pending", name)
            raise WorkerStop(name)
        logger.info("worker: %s: stopping", name)

    def _stopping(self) -> bool:
        if self._stop.is_set():
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            logger.info("worker: time limit of %.0f s reached", self.options.time_limit)
            self._stop.set()
            return True
        return False

    def _sleep(self, seconds: float) -> None:
        if self._deadline is not None:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        self._stop.wait(seconds)

    def _instance(self, table):
        """The table's instance, its jobs table declared: workers starting together race to declare it."""
        if table not in self._instances:
            for attempt in range(5):
                instance = table()  # a fresh instance: DataJoint caches the Job object, declared or not
                try:
                    _ = instance.jobs  # declares the jobs table on first access
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            self._instances[table] = instance
        return self._instances[table]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def _frozen(jobs, row: dict) -> tuple:
    return tuple(row[name] for name in jobs.primary_key)
