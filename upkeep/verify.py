"""`neureg verify`: read every stored array back and check it against the SHA-256 the database recorded.

Reads take the same path as the stages (``schemas._store.load_array``), so what verify calls damaged is
exactly what a stage would refuse: a missing or unreadable file, a shape other than the recorded one, or
content that no longer matches its hash. Files no row references are ``neureg gc``'s business.
"""

from __future__ import annotations

from ..database.store import DIGEST_SUFFIX, stored_attributes, verified
from ..errors import StoreIntegrityError
from ..populate.stages import pipeline_tables


def verify_store(pipeline, progress=None) -> dict:
    """Check every stored array of the pipeline: ``{"checked": n, "bytes": n, "damaged": [...]}``, one entry
    per damaged array with its table, key, attribute, store path and fault. ``progress(table, done, total)``
    is called after each table."""
    checked, size, damaged = 0, 0, []
    for entry in pipeline_tables(pipeline):
        table = entry.table
        for attribute in stored_attributes(table):
            keys = table.keys(order_by="KEY")
            for key in keys:
                ref, digest = (table & key).fetch1(attribute, attribute + DIGEST_SUFFIX)
                try:
                    array = verified(ref, digest, table, key, attribute)
                    size += array.nbytes
                except StoreIntegrityError as exc:
                    damaged.append(
                        {
                            "table": entry.name,
                            "key": exc.key,
                            "attribute": attribute,
                            "path": exc.path,
                            "fault": exc.fault,
                        }
                    )
                checked += 1
            if progress:
                progress(f"{entry.name}.{attribute}", len(keys))
    return {"checked": checked, "bytes": size, "damaged": damaged}
