"""The one transaction helper: DataJoint's transaction, joined when one is open, rolled back for a dry run."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def transaction(connection, commit: bool = True):
    """A transaction on ``connection``, or the caller's if one is already open on it.

    DataJoint refuses to nest transactions; a step that must be atomic on its own (a scan set, a training
    plan) may also run inside a larger one (``neureg plan paper`` registers a whole experiment at once), and
    then it simply joins it. ``commit=False`` rolls the whole transaction back at the end: a dry run that
    executes exactly what a real one would and writes nothing (only where this call opened it).
    Table declarations, which would commit implicitly on MySQL, are refused by DataJoint inside one.
    """
    if connection.in_transaction:
        yield connection
        return
    connection.start_transaction()
    try:
        yield connection
    except BaseException:
        connection.cancel_transaction()
        raise
    if commit:
        connection.commit_transaction()
    else:
        connection.cancel_transaction()
