"""Orphaned object-store files: found by DataJoint's garbage collector, removed only when old and never on doubt.

A killed ingest, a full disk or a deleted row can leave files in the store that no row references
(response blocks, a half-written ``.npy.saving``). ``datajoint.gc.GarbageCollector`` lists the files of the
pipeline's schemas that no reference covers, in the store's own section and in each lab member's
(``members/<login>``, where ingests write). Its reference scan skips (with a warning) any column holding
one value it cannot read, and then every file of that column looks unreferenced: one malformed row in a
lab member's own scan would make every scan's blocks "orphans". So neureg reads every reference itself
first (``database.store.store_references``), and any it cannot read stops gc naming the row; the
collector's candidates are kept only where neureg's own scan also finds no reference, and before deleting
the references are read again, so a row inserted meanwhile keeps its file.

The collector cannot tell an orphan from the file of a transaction still running (an ingest writes its
blocks before it commits), so files younger than ``min_age_hours`` are reported and kept; only older ones
are deleted, and only when asked. The store is a folder or an S3 bucket: ages come from the file's
modification time either way.
"""

from __future__ import annotations

import time

import datajoint as dj

from ..database.settings import STORE
from ..database.store import (
    member_sections,
    modified_at,
    remove_store_paths,
    schema_section,
    store_files,
    store_references,
)
from ..errors import StoreReferenceError


def pipeline_references(pipeline) -> set[str]:
    """Every store path any row of the pipeline's schemas references; StoreReferenceError on any doubt."""
    referenced: set[str] = set()
    for module in pipeline.modules().values():
        schema = module.schema
        for name in schema.list_tables():
            table = schema.get_table(name)
            heading = table.heading
            for attribute in [*heading.schema_objects, *heading.hash_objects]:
                referenced.update(store_references(table, attribute))
    return referenced


def _covered(path: str, referenced: set[str]) -> bool:
    """A file is referenced when a reference names it or a folder above it (DataJoint's rule)."""
    if path.endswith(".manifest.json"):
        path = path[: -len(".manifest.json")]
    parts = path.split("/")
    return any("/".join(parts[:i]) in referenced for i in range(1, len(parts) + 1))


def _orphaned(collector) -> list:
    """The collector's unreferenced schema-addressed files in its section; StoreReferenceError if it could
    not list that section completely."""
    report = collector.collect(dry_run=True)
    if report["scan_errors"]:
        raise StoreReferenceError(f"the store could not be listed completely: {report['scan_errors'][:3]}")
    return list(report["orphaned_schema_paths"])


def collect_orphans(pipeline, delete: bool = False, min_age_hours: float = 24.0, announce=None) -> dict:
    """Orphaned store files of the pipeline's schemas: ``{"old": [...], "recent": [...], "deleted": n,
    "bytes": n}`` (paths relative to the store); with ``delete``, the old ones are removed.

    ``announce(paths, total_bytes)`` is called with what is about to be deleted, before anything is.
    Raises StoreReferenceError when any reference cannot be read or the collector could not list the store.
    """
    fs, root, _ = store_files()
    referenced = pipeline_references(pipeline)  # first: a doubt stops everything before any listing
    schemas = [m.schema for m in pipeline.modules().values()]
    collector = dj.gc.GarbageCollector(*schemas, store=STORE)
    candidates = _orphaned(collector)
    for section in member_sections():  # each lab member's ingests (database.store.member_prefix)
        with schema_section(section):
            candidates += _orphaned(dj.gc.GarbageCollector(*schemas, store=STORE))
    cutoff = time.time() - min_age_hours * 3600
    old, recent, sizes = [], [], {}
    for path in candidates:  # neureg stores <npy@> (schema-addressed) objects only
        if _covered(str(path), referenced):
            continue
        try:
            info = fs.info(f"{root}/{path}")  # one stat (one request on S3) for age and size
        except FileNotFoundError:  # gone since the listing
            continue
        if modified_at(info) < cutoff:
            old.append(str(path))
            sizes[str(path)] = info.get("size") or 0
        else:
            recent.append(str(path))
    deleted = 0
    if delete and old:
        if announce is not None:
            announce(old, sum(sizes.values()))
        again = pipeline_references(pipeline)  # rows inserted since the first scan keep their files
        old = [path for path in old if not _covered(path, again)]
        deleted = remove_store_paths(old)  # one verified delete per file (see remove_store_paths)
    return {
        "old": old,
        "recent": recent,
        "deleted": deleted,
        "bytes": sum(sizes.get(path, 0) for path in old),
        "min_age_hours": min_age_hours,
    }
