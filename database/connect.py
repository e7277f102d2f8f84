"""One call that reaches the database, configures the store and activates every schema: :func:`connect`.

Zero configuration means an embedded PostgreSQL server and a local object store under ``NEUREG_HOME``
(default: the per-user data directory), so a notebook or a laptop needs nothing installed. A lab points
neureg at its server the DataJoint way: a ``datajoint.json`` (or ``.secrets/``) or the ``DJ_HOST``,
``DJ_USER``, ``DJ_PASS``, ``DJ_BACKEND`` variables. ``NEUREG_PREFIX`` names the schemas so several projects
share one server. The object store is a folder (``NEUREG_STORE``, default ``$NEUREG_HOME/store``; a shared
POSIX path when workers sit on several hosts) or any store named ``neureg`` in DataJoint's own store
configuration (``DJ_STORES`` or ``datajoint.json``), such as an S3-compatible bucket (MinIO, Ceph, AWS).

One process talks to one database: DataJoint binds the table classes to one connection and one schema
name when they are activated. What this process is connected to is one :class:`_Active` record.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType

from ..errors import ConfigurationError
from . import embedded
from .guards import check_config_files, check_tls
from .settings import STORE, Settings, default_home, dj, lab_store_configured
from .store import check_lab_store, private_folder

logger = logging.getLogger("neureg")

STAGES = ("experiment", "oracle", "predictive", "similarity", "training", "robustness")


@dataclass
class Pipeline:
    """The activated schema modules of one database, by stage (``pipe.experiment.Scan()``), upstream first."""

    prefix: str
    experiment: ModuleType
    oracle: ModuleType
    predictive: ModuleType
    similarity: ModuleType
    training: ModuleType
    robustness: ModuleType

    def modules(self) -> dict[str, ModuleType]:
        """Stage name -> schema module, in stage order."""
        return stage_modules(self)


def stage_modules(pipeline) -> dict[str, ModuleType]:
    """Stage name -> schema module of a pipeline (a :class:`Pipeline`, or any namespace of schema modules, as a
    test's toy stage): the one walk over its stages."""
    names = [f.name for f in fields(pipeline)] if isinstance(pipeline, Pipeline) else list(vars(pipeline))
    found = {}
    for name in names:
        module = getattr(pipeline, name)
        if isinstance(getattr(module, "schema", None), dj().Schema):
            found[name] = module
    return found


@dataclass
class _Active:
    """The one database this process talks to (None before :func:`connect`)."""

    settings: Settings | None = None
    target: tuple | None = None  # settings, backend, host, port, user
    connection: object = None
    pipeline: Pipeline | None = None


_active = _Active()


def active_settings() -> Settings | None:
    """The settings of the connected pipeline (None before connect()), for commands that report them."""
    return _active.settings


def home_folder() -> Path:
    """The home of the connected pipeline (``--home`` honoured), else ``NEUREG_HOME`` or the per-user folder:
    where scratch files, demo folders and (with no shared store) checkpoints go."""
    return _active.settings.home if _active.settings is not None else default_home().resolve()


def figures_folder() -> Path:
    """Where figures and tables go unless a command is told otherwise: ``NEUREG_FIGURES``, else ``figures/``
    in the home. One folder for ``neureg report``, ``neureg demo`` and the notebook."""
    chosen = os.environ.get("NEUREG_FIGURES", "").strip()
    return Path(chosen).expanduser() if chosen else home_folder() / "figures"


def connect(home=None, prefix=None, backend=None, *, create_tables=True) -> Pipeline:
    """Connect, activate every schema of the pipeline, and return them as one :class:`Pipeline`.

    ``pipe = neureg.connect(); pipe.experiment.Scan()`` is all a notebook needs. The backend is chosen as
    :meth:`Settings.resolve` says: the ``backend`` argument, else ``NEUREG_BACKEND``, else ``server`` when
    DataJoint is configured for one (``DJ_HOST``, a ``datajoint.json``), else the embedded PostgreSQL server.

    Calling ``connect`` again with the same settings is free (and reconnects in place if the server dropped
    the connection); settings that need another server, home, store or schema prefix raise
    :class:`ConfigurationError`: use another process for them (the test suite runs one pytest process per
    backend: ``python -m pytest --backend mysql``).
    """
    settings = Settings.resolve(home, prefix, backend)
    if _active.settings is not None and _active.settings != settings:  # before a server starts under another home
        raise _one_database_error(_active.settings, settings)
    if settings.backend == "embedded":
        # Two first commands on a new home (``init`` and ``status`` at once) must not both start the
        # server or declare the schemas: one waits for the other.
        with embedded.home_lock(settings.home):
            return _connect(settings, create_tables)
    return _connect(settings, create_tables)


def ensure_embedded_server() -> bool:
    """Start the embedded server again if it stopped under this process (killed, crashed); True if it did.

    Every command starts the server when it begins, but a long-running worker only reconnects: it calls this
    first, or it would retry a dead socket forever. The connection follows the socket if it moved. Nothing
    happens (False) for a lab server or before :func:`connect`.
    """
    settings = _active.settings
    if settings is None or settings.backend != "embedded":
        return False
    with embedded.home_lock(settings.home):
        server, restarted = embedded.embedded_server(settings.home)
    if restarted:
        logger.warning("the embedded database server had stopped; it runs again (pid %d)", server.get_pid())
        config = dj().config
        for key, value in embedded.embedded_settings(server).items():
            config[key] = value
        _active.connection.conn_info.update(host=config["database.host"], port=config["database.port"])
        _active.target = (settings, *(config[f"database.{k}"] for k in ("backend", "host", "port", "user")))
    return restarted


def _one_database_error(active: Settings, wanted: Settings, detail: str = "") -> ConfigurationError:
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


def _server_error(config, exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"cannot connect to the {config['database.backend']} server at {config['database.host']}: {exc}"
    )


def _connect(settings: Settings, create_tables: bool) -> Pipeline:
    datajoint = dj()
    config = datajoint.config
    overrides = embedded.start_embedded(settings.home) if settings.backend == "embedded" else {}
    for key, value in overrides.items():
        config[key] = value
    server = tuple(config[f"database.{k}"] for k in ("backend", "host", "port", "user"))
    target = (settings, *server)
    if _active.settings is not None:
        if _active.target != target:
            was = "{} server at {}:{} as {}".format(*_active.target[1:])
            now = "{} server at {}:{} as {}".format(*server)
            raise _one_database_error(_active.settings, settings, f"{was} -> {now}")
        if not _active.connection.is_connected:  # in place: the activated table classes keep this object
            try:
                _active.connection.connect()
            except Exception as exc:
                raise _server_error(config, exc) from exc
        if _active.pipeline is not None:
            return _active.pipeline
    else:
        check_config_files()
        if settings.backend == "server" and not config["database.password"]:
            raise ConfigurationError(
                "a database server is configured but no password is set: set DJ_PASS (or database.password in "
                "datajoint.json / .secrets/database.password)"
            )
        lab_store_configured()  # snapshot the lab's stores before neureg adds its own
        if settings.store is not None:
            private_folder(settings.store)
            stores = dict(config.stores or {})
            stores[STORE] = {"protocol": "file", "location": str(settings.store)}
            config.stores = stores
        else:
            check_lab_store()
        # safemode (DataJoint's delete/drop confirmation) stays as the user configured it: on by default, so
        # a notebook's stray delete asks first. Only workers, which never delete interactively, turn it off.
        try:
            connection = datajoint.conn(reset=True)
        except Exception as exc:
            raise _server_error(config, exc) from exc
        check_tls(connection, config)
        # From here the schema modules get bound to this connection: the process keeps this database, and
        # a connect() after a failed activation below finishes it on the same connection.
        _active.settings, _active.target, _active.connection = settings, target, connection
    _active.pipeline = _activate_with_retry(settings.prefix, create_tables=create_tables)
    logger.debug("neureg connected: %s backend, schema prefix %r", settings.backend, settings.prefix)
    return _active.pipeline


def _activate_with_retry(prefix: str, create_tables: bool, tries: int = 4) -> Pipeline:
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


def _activate_schemas(prefix: str, create_tables: bool) -> Pipeline:
    modules = {}
    for stage in STAGES:
        module = importlib.import_module(f"neureg.schemas.{stage}")
        try:
            module.activate(prefix, create_tables=create_tables)  # a no-op for a schema already activated
        except Exception:
            # DataJoint marks a schema activated before it declares its tables, and a second activate()
            # then returns at once: forget the half-done activation so that the next try declares the
            # tables left (the ones declared already are only bound again).
            module.schema.database = None
            raise
        modules[stage] = module
    return Pipeline(prefix=prefix, **modules)
