"""Orphaned object-store files: found by DataJoint's garbage collector, removed only when old enough.

A killed ingest, a full disk or a deleted row can leave files in the store that no row references
(response blocks, a half-written ``.npy.saving``). ``datajoint.gc.GarbageCollector`` lists exactly those
for the pipeline's schemas. It cannot tell an orphan from the file of a transaction still running (an
ingest writes its blocks before it commits), so files younger than ``min_age_hours`` are reported and
kept; only older ones are deleted, and only when asked.
"""

from __future__ import annotations

import time
from pathlib import Path

import datajoint as dj

from ..connection import STORE
from .stages import stage_modules


def collect_orphans(pipeline, delete: bool = False, min_age_hours: float = 24.0) -> dict:
    """Orphaned store files of the pipeline's schemas: ``{"old": [...], "recent": [...], "deleted": n,
    "bytes": n}`` (paths relative to the store); with ``delete``, the old ones are removed."""
    spec = dj.config.get_store_spec(STORE)
    if spec.get("protocol") != "file":
        raise ValueError(f"neureg gc judges a file's age on a local or shared file store; the '{STORE}' store "
                         f"uses {spec.get('protocol')!r} (run DataJoint's GarbageCollector there by hand)")
    collector = dj.gc.GarbageCollector(*(m.schema for m in stage_modules(pipeline).values()), store=STORE)
    report = collector.collect(dry_run=True)
    root, cutoff = Path(spec["location"]), time.time() - min_age_hours * 3600
    old, recent, size = [], [], 0
    for path in report["orphaned_schema_paths"]:  # neureg stores <npy@> (schema-addressed) objects only
        try:
            stat = (root / path).stat()
        except FileNotFoundError:  # gone since the listing
            continue
        is_old = stat.st_mtime < cutoff
        (old if is_old else recent).append(str(path))
        size += stat.st_size if is_old else 0
    deleted = sum(bool(collector.delete_schema_path(path)) for path in old) if delete else 0
    return {"old": old, "recent": recent, "deleted": deleted, "bytes": size, "min_age_hours": min_age_hours}
