"""Orphaned object-store files: found by DataJoint's garbage collector, removed only when old enough.

A killed ingest, a full disk or a deleted row can leave files in the store that no row references
(response blocks, a half-written ``.npy.saving``). ``datajoint.gc.GarbageCollector`` lists exactly those
for the pipeline's schemas. It cannot tell an orphan from the file of a transaction still running (an
ingest writes its blocks before it commits), so files younger than ``min_age_hours`` are reported and
kept; only older ones are deleted, and only when asked. The store is a folder or an S3 bucket: ages come
from the file's modification time either way.
"""

from __future__ import annotations

import time

import datajoint as dj

from ..database.settings import STORE
from ..database.store import modified_at, store_files


def collect_orphans(pipeline, delete: bool = False, min_age_hours: float = 24.0) -> dict:
    """Orphaned store files of the pipeline's schemas: ``{"old": [...], "recent": [...], "deleted": n,
    "bytes": n}`` (paths relative to the store); with ``delete``, the old ones are removed."""
    fs, root, _ = store_files()
    collector = dj.gc.GarbageCollector(*(m.schema for m in pipeline.modules().values()), store=STORE)
    report = collector.collect(dry_run=True)
    cutoff = time.time() - min_age_hours * 3600
    old, recent, size = [], [], 0
    for path in report["orphaned_schema_paths"]:  # neureg stores <npy@> (schema-addressed) objects only
        try:
            info = fs.info(f"{root}/{path}")  # one stat (one request on S3) for age and size
        except FileNotFoundError:  # gone since the listing
            continue
        is_old = modified_at(info) < cutoff
        (old if is_old else recent).append(str(path))
        size += (info.get("size") or 0) if is_old else 0
    deleted = sum(bool(collector.delete_schema_path(path)) for path in old) if delete else 0
    return {"old": old, "recent": recent, "deleted": deleted, "bytes": size, "min_age_hours": min_age_hours}
