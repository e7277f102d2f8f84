"""Registering scan sets: the explicit step between ingesting scans and the tables that compare scans.

``experiment.ScanSet`` rows are what ``oracle.ScanStability`` and ``similarity.SimilarityTarget`` are keyed
on. Which scans belong together is a choice (the same oracle images, one mouse, a whole cohort), so no
populate step makes it behind the user's back: ``neureg scanset`` (or these functions in a notebook) does,
and the workers then fill whatever sets exist. ``ScanSet.create`` is idempotent: registering the same
scans again returns the existing set.
"""

from __future__ import annotations

import datajoint as dj

from ..models.digests import plain


def oracle_groups(pipeline) -> list[tuple[int, list[dict]]]:
    """Groups of two or more scans shown exactly the same oracle images: their S^oracle compare image for image.

    The grouping is ``oracle.OracleStats.oracle_set`` (a hash of the oracle images whose responses were
    recorded), which populate fills: run the oracle stage first. Returns (number of oracle images, scan
    keys) per group, scans in key order (docs/science.md §4).
    """
    stats = pipeline.oracle.OracleStats
    scan_attributes = pipeline.experiment.Scan().primary_key
    by_set: dict[str, list[dict]] = {}
    sizes: dict[str, int] = {}
    for row in stats.proj("oracle_set", "n_oracle_images").to_dicts(order_by="KEY"):
        by_set.setdefault(row["oracle_set"], []).append({a: plain(row[a]) for a in scan_attributes})
        sizes[row["oracle_set"]] = int(row["n_oracle_images"])
    return [(sizes[s], keys) for s, keys in by_set.items() if len(keys) >= 2]


def register_sets(pipeline, groups) -> list[dict]:
    """Register a scan set for each (scan keys, note) of ``groups``; describe each set and whether it is new."""
    scan_set = pipeline.experiment.ScanSet
    existing = {key["scan_set"] for key in scan_set().keys()}
    described = []
    for scan_keys, note in groups:
        try:
            key = scan_set.create(scan_keys, note=note)
        except dj.errors.DuplicateError:  # another process registered the same set at the same moment
            key = scan_set.create(scan_keys, note=note)
        row = (scan_set & key).fetch1()
        described.append(
            {
                "scan_set": key["scan_set"],
                "n_scans": int(row["n_scans"]),
                "note": row["scan_set_note"],
                "new": key["scan_set"] not in existing,
                "members": (scan_set & key).members(),
            }
        )
    return described


def register_oracle_groups(pipeline) -> list[dict]:
    """One scan set per group of two or more scans shown exactly the same oracle images (``oracle_groups``)."""
    return register_sets(pipeline, [(keys, f"scans sharing {n} oracle images") for n, keys in oracle_groups(pipeline)])


def register_all(pipeline) -> list[dict]:
    """One scan set of every ingested scan: the cohort-wide set a similarity target usually averages over."""
    exp = pipeline.experiment
    keys = (exp.Scan & exp.Ingestion).keys()  # sealed scans only: a hand-made row is not a scan
    if not keys:
        raise ValueError("no scans are ingested yet: there is nothing to put in a set")
    return register_sets(pipeline, [(keys, f"all {len(keys)} ingested scans")])
