"""The `neureg` command: a thin layer over functions a notebook can call just as well.

Every command lives in one of the modules of :data:`COMMAND_MODULES` and is added by that module's
``register(subparsers)``; exit statuses are :mod:`neureg.errors`' ``EXIT_*``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_FAILED, ConfigurationError, denied_by_server

#: The modules that declare commands, in the order ``neureg --help`` lists them.
COMMAND_MODULES = ("data", "compute", "worker", "accounts", "completion")


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The `neureg` argument parser (a function, so tests can list every command and its help)."""
    parser = argparse.ArgumentParser(
        prog="neureg",
        description="Brain-regularized robust vision models: mouse V1 scans -> similarity targets -> "
        "regularized CNNs -> robustness scores, on a DataJoint database.",
    )
    parser.add_argument("--home", help="data directory for the embedded database and store (env NEUREG_HOME)")
    parser.add_argument("--prefix", help="schema name prefix (env NEUREG_PREFIX, default 'neureg_')")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at debug level")
    parser.add_argument("--version", action="version", version=f"neureg {_version()}")
    parser.set_defaults(root_parser=parser)  # `neureg completion` describes the parser it was parsed by
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    """The `neureg` entry point: parse, log to stderr, run the command; configuration faults exit 4."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that start copies of themselves
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    from ..database.settings import quiet_datajoint

    quiet_datajoint(verbose=args.verbose)
    try:
        return args.func(args) or 0
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - the faults a lab meets get one line, not a traceback
        denied = permission_message(exc)
        if denied is not None:
            print(f"error: {denied}", file=sys.stderr)
            return EXIT_BAD_INPUT
        message = fault_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_FAILED


def permission_message(exc: BaseException) -> str | None:
    """One line for a command this database account may not run (a lab account starting a worker, say),
    or None. The transaction was rolled back by the server: nothing was written."""
    if not denied_by_server(exc):
        return None
    import datajoint as dj

    try:
        user = dj.config["database.user"] or "this account"
    except Exception:  # noqa: BLE001 - the message is still right without the name
        user = "this account"
    detail = " ".join(str(part) for part in exc.args[1:2] or exc.args[:1]).strip().splitlines()
    detail = detail[0][:200] if detail else type(exc).__name__
    return (
        f"the database account {user!r} may not do this ({detail}); nothing was written. Lab accounts ingest "
        "and read; workers and `neureg plan` need the worker or administrator account (README: Running at lab scale)"
    )


def fault_message(exc: BaseException) -> str | None:
    """One line for an environment fault (database gone, disk full), or None for a bug (keep the traceback).

    Every write is transactional, so after such a fault nothing is half-written; the command can be rerun.
    """
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}; nothing was half-written, free space and rerun"
    names = {cls.__name__ for cls in type(exc).__mro__}
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    lost = "OperationalError" in names or "InterfaceError" in names or "LostConnectionError" in names
    if lost and modules & {"psycopg2", "pymysql", "datajoint"}:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"lost the database server ({first}); nothing was half-written, rerun when it is back "
            "(the embedded server restarts with the next command)"
        )
    return None
