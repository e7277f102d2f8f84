"""What every command shares: how it connects, how it says a fault, how it prints JSON.

Every command module has one ``register(subparsers)`` that adds its commands; each command is a
``cmd_*(args) -> int`` returning an exit status from :mod:`neureg.errors` (``EXIT_*``).
"""

from __future__ import annotations

import json
import sys

from ..errors import EXIT_BAD_INPUT


def add_command(sub, function, summary: str):
    """Add the command ``function`` (``cmd_<name>``) implements: ``summary`` is its line in ``neureg --help``,
    the function's docstring its description in ``neureg <name> --help``. Returns its parser."""
    name = function.__name__.removeprefix("cmd_")
    parser = sub.add_parser(name, help=summary, description=function.__doc__.replace("`", ""))
    parser.set_defaults(func=function)
    return parser


def connect_from(args):
    """The pipeline of the database the command line names (``--home``, ``--prefix``), connected."""
    from ..database.connect import connect

    return connect(home=getattr(args, "home", None), prefix=getattr(args, "prefix", None))


def refuse(message, code: int = EXIT_BAD_INPUT) -> int:
    """Print one ``error:`` line to stderr; return the exit status (bad input unless told otherwise)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def print_json(value) -> None:
    """One JSON document on stdout (the only thing a ``--json`` command prints there)."""
    print(json.dumps(value, indent=1, default=str))
