"""Ingestion: a scan folder (or the .zip it was published as) on disk -> experiment tables, all or nothing.

The scan-folder concern in one package: the format (``folder``: layout, ``ScanData``, reading and writing),
the checks of each file (``validation``), the scan's identity (``identity``), published archives
(``archives``) and the one insert path (``insert``). :func:`ingest_folder` is what the command line, the
demo and a notebook call.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ScanExistsError, ScanFolderError
from .archives import unpacked
from .folder import ScanData, read_scan_folder, write_scan_folder
from .insert import insert_scan

__all__ = [
    "ScanData",
    "ScanExistsError",
    "ScanFolderError",
    "ingest_folder",
    "insert_scan",
    "read_scan_folder",
    "write_scan_folder",
]

logger = logging.getLogger("neureg")


def ingest_folder(path: Path | str, pipeline=None) -> dict:
    """Validate the whole folder (or zip) first, then insert it in one transaction; return the scan's key.

    Raises ``ScanFolderError`` (bad input, database untouched) or ``ScanExistsError`` (already there).
    ``pipeline`` is accepted for the callers that hold one; the tables are the connected ones either way.
    """
    path = Path(path).resolve()
    with unpacked(path) as (root, names):  # the images are read again while they are inserted
        data: ScanData = read_scan_folder(root, names)
        key = insert_scan(data, source_path=str(path))
    withheld = int(data.withheld.sum())
    logger.info(
        "ingested %s: %d trials x %d units, %d distinct images%s",
        path,
        data.n_trials,
        data.n_units,
        len(data.images),
        f", {withheld} trials with withheld responses" if withheld else "",
    )
    return key
