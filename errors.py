"""Errors a lab member sees; defined once, outside the schema modules, so they survive a reconnect."""


class ScanExistsError(RuntimeError):
    """Re-ingesting a scan is refused: delete it first if it really must be replaced."""


class StoreIntegrityError(RuntimeError):
    """A stored array is missing, unreadable, or differs from what was recorded at insert: nothing computes
    from it. Carries where it is (``table``, ``key``, ``path``) and what is wrong (``fault``)."""

    def __init__(self, message: str, *, table: str = "", key: dict | None = None, path: str = "", fault: str = ""):
        super().__init__(message)
        self.table, self.key, self.path, self.fault = table, dict(key or {}), path, fault
