"""Every error a lab member sees, and the exit status each one means, in one place.

Defined outside the schema modules (so they survive a reconnect) and outside the command line (so a notebook
catches the same classes a script tests the exit status of). Nothing here imports anything: every layer
of neureg may raise these.
"""

from __future__ import annotations

from pathlib import Path

#: Exit statuses of the ``neureg`` command. 1 is an environment fault (database lost, disk full) or a failed job.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # a bad file, config or argument: one line naming it; nothing was written
EXIT_CONFLICT = 3  # the thing exists already (a scan ingested before)
EXIT_CONFIG = 4  # the environment names a database or store that cannot be used


class ConfigurationError(RuntimeError):
    """The environment names a database or store that cannot be used; the message says how to fix it."""


class ScanFolderError(ValueError):
    """A scan folder that cannot be ingested; the message names the file and the fault."""

    def __init__(self, path: Path | str, fault: str):
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{path}: {fault}")


class ScanExistsError(RuntimeError):
    """Re-ingesting a scan is refused: delete it first if it really must be replaced."""


class DatasetError(ValueError):
    """A dataset is missing or not in the expected format; the message names the file and the fault."""


class PlanError(ValueError):
    """A plan that cannot be made as asked (too few scans, an unreadable dataset): nothing was written."""


class StoreIntegrityError(RuntimeError):
    """A stored array is missing, unreadable, or differs from what was recorded at insert: nothing computes
    from it. Carries where it is (``table``, ``key``, ``path``) and what is wrong (``fault``)."""

    def __init__(self, message: str, *, table: str = "", key: dict | None = None, path: str = "", fault: str = ""):
        super().__init__(message)
        self.table, self.key, self.path, self.fault = table, dict(key or {}), path, fault


class StoreReferenceError(RuntimeError):
    """A row's store reference cannot be read: nothing that decides what to delete may go on without it.
    The message names the table, the row and what is wrong with the reference."""


#: Server error codes that mean "this account may not": MySQL's database/table/column/privilege denied,
#: PostgreSQL's insufficient_privilege.
DENIED_CODES = (1044, 1142, 1143, 1227)


def denied_by_server(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing this account a statement (DataJoint's AccessError, or the
    driver's own error where DataJoint passes it through): a wrong account, not a failed computation."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    code = exc.args[0] if exc.args else None
    pgcode = getattr(exc, "pgcode", None) or getattr(exc.__cause__, "pgcode", None)
    return "AccessError" in names or "InsufficientPrivilege" in names or code in DENIED_CODES or pgcode == "42501"
