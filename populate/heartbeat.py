"""A heartbeat for the running job: the one thing the worker needs that DataJoint's jobs API lacks.

DataJoint 2.3 judges a reservation by its age alone: ``Job.refresh(orphan_timeout=S)`` gives a job back to
pending once its ``reserved_time`` is S seconds old, and nothing renews that time while the job runs. A
timeout longer than any job (training runs for hours) leaves the job of a worker killed with SIGKILL
stranded for as long; a shorter one hands a living worker's job to a second worker. So while a job runs,
a thread sets its ``reserved_time`` to the server's clock every ``orphan_timeout / 4`` seconds, from a
connection of its own: the age that ``refresh`` judges then means "time since the worker was last seen
alive", and a ten-hour GPU job is never taken from a living worker while a dead one's is reclaimed
``orphan_timeout`` later.

A second connection because the worker's own may be inside a long ``make`` transaction or blocked in a
query; the beat must not wait for either. ``Table.update1`` cannot serve: it has no condition beyond the
key, and it would run on that busy connection. So the beat is one UPDATE, matched on the key, this
process's host and pid, and ``status = 'reserved'`` (a job already given back is never touched), with
every value passed as a query parameter.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import datajoint as dj

from .worker_jobs import HOST, job_key

logger = logging.getLogger("neureg")

STILL_RUNNING_EVERY = 600  # seconds between "still running" lines for a long job (besides the stage's own)


def beat_statement(jobs, key: dict) -> tuple[str, tuple]:
    """(UPDATE statement, its arguments) renewing the reservation of this process's job ``key``."""
    q = jobs.adapter.quote_identifier
    key = job_key(jobs, key)
    matches = [f"{q(name)}=%s" for name in key] + [f"{q('host')}=%s", f"{q('pid')}=%s", f"{q('status')}='reserved'"]
    statement = (
        f"UPDATE {jobs.full_table_name} SET {q('reserved_time')}=CURRENT_TIMESTAMP(3) WHERE {' AND '.join(matches)}"
    )
    values = (value.item() if hasattr(value, "item") else value for value in key.values())  # numpy scalars
    return statement, (*values, HOST, os.getpid())


class Heartbeat(threading.Thread):
    """Keeps the current job's ``reserved_time`` fresh (see the module notes) and says every ten minutes
    that a long job is still running. Failures (the server is restarting) are logged once and retried on
    the next beat."""

    def __init__(self, connection, interval: float):
        super().__init__(name="neureg-heartbeat", daemon=True)
        self._info = dict(connection.conn_info)
        self._backend = connection.adapter.backend
        self._interval = interval
        self._targets = []  # (UPDATE statement, args) of each running job
        self._label, self._since, self._next_report = "", 0.0, 0.0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._connection = None
        self._failing = False

    def watch(self, jobs, key: dict | list[dict], label: str) -> None:
        """Beat for this job, or these jobs of one group, (``label`` names it in the "still running" lines)
        until ``clear()``. A job of the group that is already done is no longer matched by its beat."""
        keys = key if isinstance(key, list) else [key]
        with self._lock:
            self._targets = [beat_statement(jobs, k) for k in keys]
            self._label, self._since = label, time.monotonic()
            self._next_report = self._since + STILL_RUNNING_EVERY

    def clear(self) -> None:
        """Stop beating: the job is over (done, failed or released)."""
        with self._lock:
            self._targets = []

    def stop(self) -> None:
        """End the thread and close its connection (the worker is stopping)."""
        self._done.set()
        if self.is_alive():
            self.join(timeout=5)
        self._close()

    def run(self) -> None:
        while not self._done.wait(self._interval):
            with self._lock:
                targets, label, since = list(self._targets), self._label, self._since
                report = bool(targets) and time.monotonic() >= self._next_report
                if report:
                    self._next_report += STILL_RUNNING_EVERY
            for target in targets:
                self._beat(*target)
            if report:
                logger.info("still running %s (%.0f min)", label, (time.monotonic() - since) / 60)

    def _beat(self, statement: str, args: tuple) -> None:
        try:
            if self._connection is None:
                info = self._info
                self._connection = dj.Connection(
                    info["host"],
                    info["user"],
                    info["passwd"],
                    info["port"],
                    info.get("ssl_input"),
                    database_name=info.get("database_name"),
                    backend=self._backend,
                )
            self._connection.query(statement, args=args)
            if self._failing:
                logger.info("worker: heartbeat restored")
            self._failing = False
        except Exception as exc:  # the server may be restarting: say so once, try again next beat
            if not self._failing:
                reason = " ".join(str(exc).split())[:200]
                logger.warning("worker: heartbeat failed (%s: %s); retrying", type(exc).__name__, reason)
            self._failing = True
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
        self._connection = None
