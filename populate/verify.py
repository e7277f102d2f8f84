"""`neureg verify`: read every stored array back and check it against the SHA-256 the database recorded.

Reads take the same path as the stages (``schemas._store.load_array``), so what verify calls damaged is
exactly what a stage would refuse: a missing or unreadable file, a shape other than the recorded one, or
content that no longer matches its hash. Files no row references are ``neureg gc``'s business.
"""

from __future__ import annotations

import json
import sys
import time

from ..errors import StoreIntegrityError
from ..schemas._store import DIGEST_SUFFIX, stored_attributes, verified
from .stages import pipeline_tables


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
                    damaged.append({"table": entry.name, "key": exc.key, "attribute": attribute,
                                    "path": exc.path, "fault": exc.fault})
                checked += 1
            if progress:
                progress(f"{entry.name}.{attribute}", len(keys))
    return {"checked": checked, "bytes": size, "damaged": damaged}


def cmd_verify(args) -> int:
    """`neureg verify`: exit 0 when every stored array matches its hash, 1 when any is damaged (listed)."""
    from ..connection import connect

    pipeline = connect(home=args.home, prefix=args.prefix)
    start = time.perf_counter()

    def progress(name: str, n: int) -> None:
        if not args.json:
            print(f"  {name}: {n} array(s)", file=sys.stderr, flush=True)

    report = verify_store(pipeline, progress)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        for d in report["damaged"]:
            print(f"damaged  {d['table']}.{d['attribute']} {d['key']}: {d['fault']} ({d['path']})")
        print(f"{report['checked']} stored array(s) checked ({report['bytes'] / 2**20:.1f} MB) in "
              f"{report['seconds']} s; {len(report['damaged'])} damaged", file=sys.stderr)
    return 1 if report["damaged"] else 0


def register_cli(subparsers) -> None:
    """Add the ``verify`` command to neureg's argparse subparsers."""
    p = subparsers.add_parser(
        "verify", help="check every stored array against the SHA-256 recorded at insert",
        description="Reads every array in the object store back and compares its shape and SHA-256 with what "
        "the database recorded. Lists each damaged one (table, key, file, fault) and exits 1 if any is; "
        "a stage would refuse the same arrays. Orphaned files are `neureg gc`'s.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
