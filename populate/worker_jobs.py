"""What the worker does to DataJoint's jobs tables beyond ``reserve`` / ``complete`` / ``error`` / ``refresh``.

DataJoint 2.3 keeps one jobs table per computed table (``~~name``; status pending / reserved / success /
error / ignore, with reserved_time, completed_time, host, pid and error_message). It reclaims a reservation
only by its age (``refresh(orphan_timeout=...)``) and never retries an error. The worker adds, through
DataJoint's public API (restrictions, fetches and ``Table.update1``, as ``Job.complete``/``Job.error`` do):

* **Attempts in the error message.** A failure is recorded as ``"[attempt 2 of 3] ValueError: ..."``.
  The count lives in the jobs table itself (durable, shown by ``neureg status``/the jobs table, no extra
  table); a retry resets the row to pending but keeps the message, so the next attempt knows its number.
* **Deaths count.** A reservation whose worker stopped beating (killed, out of memory, segfault, lost
  node) is turned into an error, "[attempt n of m] worker died k time(s) ...", by ``reclaim_dead``; the
  worker never asks DataJoint's ``refresh`` to reclaim orphans, since it deletes the row and inserts a
  fresh pending one without its message, and a job that kills every worker that takes it would be retried
  forever. As an error it is retried like any failure (the first death at once: a preempted or lost node
  says nothing about the job), and stays in error once its attempts are used.
* **Retry with backoff** (``retry_failed``), judged on the server's clock.
* **Release.** A job this process holds goes back to pending (SIGTERM, a lost connection, a restart of
  a container whose new worker has the same host name and pid), with its previous message restored.

Release matches rows on host and pid as well as on status, so a worker only ever gives back its own
jobs. The heartbeat that keeps a long job's reservation fresh is in ``heartbeat.py``.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import re

from datajoint.errors import DataJointError

logger = logging.getLogger("neureg")

# The width of ``error_message`` in DataJoint 2.3's jobs tables (varchar(2047)); a longer message would be
# cut by the server (MySQL) or refused (PostgreSQL), so tags are fitted to it here.
ERROR_MESSAGE_LENGTH = 2047
ATTEMPT_TAG = re.compile(r"^\[attempt (\d+) of \d+\] ")
DEATHS = re.compile(r"worker died (\d+) time")
# Errors that say a job was interrupted, not that it failed: a worker stopped by a signal, or a notebook's
# populate(reserve_jobs=True) stopped with Ctrl-C. They go back to pending at once and count no attempt.
INTERRUPTIONS = ("SystemExit", "KeyboardInterrupt", "WorkerStop")
HOST = platform.node()


def job_key(jobs, key: dict) -> dict:
    """The jobs table's primary key out of a row or a target key (which may carry more attributes)."""
    return {name: key[name] for name in jobs.primary_key}


def attempts_recorded(message: str | None, status: str) -> int:
    """How many attempts a job row has used: from its tag, else 1 for a failure and 0 otherwise."""
    match = ATTEMPT_TAG.match(message or "")
    if match:
        return int(match.group(1))
    return 1 if status == "error" else 0


def tag_message(message: str, attempt: int, max_attempts: int) -> str:
    """The error message with its attempt tag, fitted to the jobs table's column: the retry count lives here."""
    tagged = f"[attempt {attempt} of {max_attempts}] {ATTEMPT_TAG.sub('', message)}"
    return tagged if len(tagged) <= ERROR_MESSAGE_LENGTH else tagged[: ERROR_MESSAGE_LENGTH - 3] + "..."


def server_now(connection) -> datetime.datetime:
    """The database server's clock (naive, in the session's time zone, as datetime(3) columns come back).

    Ages are judged on the server's clock, never the worker's: workers on several machines disagree.
    """
    now = connection.query("SELECT CURRENT_TIMESTAMP(3)").fetchone()[0]
    return now.replace(tzinfo=None) if getattr(now, "tzinfo", None) else now


def _to_pending(jobs, key: dict, message: str, now) -> bool:
    """Set one job row back to pending, due now; False if the row vanished meanwhile (``refresh`` removed it)."""
    key = job_key(jobs, key)
    try:
        jobs.update1(
            {**key, "status": "pending", "reserved_time": None, "error_message": message, "scheduled_time": now}
        )
    except DataJointError:
        if jobs & key:  # not a vanished row (a lost connection, say): the caller must know
            raise
        return False
    return True


def release(jobs, key: dict | None = None, message: str = "") -> int:
    """Put this process's reserved job (or all of them with ``key=None``) back to pending; return how many.

    An interrupted job may already have been marked ``error`` by DataJoint's own SIGTERM handling; that row
    is ours too (same host and pid) and is released the same way.

    The rows are chosen by a fetch (host, pid, status) and then updated by key: two statements, not one
    conditional UPDATE. Between them another worker can change such a row only by reclaiming it as an
    orphan (``refresh``) and reserving it again; the update would then put that reservation back to
    pending. It takes a row older than the orphan timeout (a job this process is running is kept fresh
    by the heartbeat, so only rows of an earlier process with this host and pid qualify) and a reclaim
    within the milliseconds between the two statements. The cost is at most one job computed twice:
    ``make`` runs in a transaction and rows are keyed, so the later insert fails as a duplicate (recorded
    as an attempt, then completed as "already" on retry) and nothing is doubled or half-written.
    """
    mine = jobs & {"host": HOST, "pid": os.getpid()}
    mine = mine & ("status in ('reserved', 'error')" if key is not None else "status = 'reserved'")
    if key is not None:
        mine = mine & job_key(jobs, key)
    rows = mine.keys()
    if not rows:
        return 0
    now = server_now(jobs.connection)
    return sum(_to_pending(jobs, row, message, now) for row in rows)


def retry_failed(jobs, max_retries: int, retry_delay: int) -> list[tuple[dict, int, str]]:
    """Reset failed jobs that have attempts left and have waited long enough; return (key, attempts, message).

    Policy: a job gets ``1 + max_retries`` attempts. After its n-th failure it waits
    ``retry_delay * 2**(n-1)`` seconds (server clock, from the failure's ``completed_time``) before going
    back to pending. Interruptions (see ``INTERRUPTIONS``) go back at once and are not counted. A job out of
    attempts stays ``error`` until someone deletes its job row (``(Table.jobs & key).delete()``) or resets it.

    Each row is fetched, judged, checked again to be still in error, then updated by key (``update1``).
    Two workers retrying the same row at once both write the same pending row (one extra log line). A row
    that another worker resets and reserves between the check and the update goes back to pending under
    it and may run once more; as for ``release``, the duplicate insert fails and nothing is doubled.
    """
    rows = jobs.errors.proj("error_message", "completed_time").to_dicts()
    if not rows:
        return []
    now = server_now(jobs.connection)
    reset = []
    for row in rows:
        key = job_key(jobs, row)
        message = row["error_message"] or ""
        interrupted = message.startswith(INTERRUPTIONS)
        attempts = 0 if interrupted else attempts_recorded(message, "error")
        if attempts >= 1 + max_retries:
            continue
        died = DEATHS.search(ATTEMPT_TAG.sub("", message))
        first_death = died is not None and int(died.group(1)) == 1  # a preempted node: no reason to wait
        wait = 0 if interrupted or first_death else retry_delay * 2 ** (attempts - 1)
        failed_at = row["completed_time"]
        if failed_at is not None and (now - failed_at).total_seconds() < wait:
            continue
        if not (jobs.errors & key):  # another worker was quicker
            continue
        if _to_pending(jobs, key, "" if interrupted else message, now):
            reset.append((key, attempts, message))
    return reset


def reclaim_dead(jobs, orphan_timeout: int, max_attempts: int) -> list[tuple[dict, int]]:
    """Turn reservations not refreshed for ``orphan_timeout`` seconds into errors that count an attempt.

    A reserved row keeps the message of its previous attempt (``reserve`` does not clear it), so the count
    goes on from there. Returns (key, deaths) of the rows reclaimed. Two workers reclaiming the same row at
    once write the same error (an extra log line, no extra attempt).
    """
    now = server_now(jobs.connection)
    cutoff = now - datetime.timedelta(seconds=orphan_timeout)
    stale = jobs.reserved.proj("error_message", "reserved_time", "host", "pid")
    reclaimed = []
    for row in stale.to_dicts():
        if row["reserved_time"] is not None and row["reserved_time"] >= cutoff:
            continue
        key = job_key(jobs, row)
        previous = row["error_message"] or ""
        attempt = attempts_recorded(previous, "pending") + 1
        died = DEATHS.search(previous)
        deaths = (int(died.group(1)) if died else 0) + 1
        message = tag_message(
            f"worker died {deaths} time(s) running this job: {row['host']} pid {row['pid']} was last seen "
            f"{row['reserved_time']} (server time) and stopped beating (killed, out of memory, crashed or lost)",
            attempt,
            max_attempts,
        )
        if not (jobs.reserved & key & {"pid": row["pid"], "host": row["host"]}):
            continue  # released or reclaimed by someone else meanwhile
        try:
            jobs.update1({**key, "status": "error", "error_message": message, "completed_time": now})
        except DataJointError:
            if jobs & key:
                raise
            continue
        reclaimed.append((key, deaths))
    return reclaimed
