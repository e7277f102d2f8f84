"""`neureg gc`: store files no row references are found by DataJoint's collector and removed only when old."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from neureg.ingestion import ingest_folder


def _gc(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "neureg.cli", "gc", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_old_orphans_are_removed_recent_ones_and_live_files_kept(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, subprocess_env
):
    exp = pipeline.experiment
    key = ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=21), pipeline)
    before = exp.load_responses(key)
    live = sorted((pipeline.home / "store").rglob(f"mouse={unique_mouse}/**/*.npy"))
    assert live, "the scan's response blocks are in the store"
    folder = live[0].parent
    old = folder / "responses_killedingest.npy"  # what a killed ingest leaves: a file no row names
    old.write_bytes(live[0].read_bytes())
    partial = folder / "responses_fulldisk.npy.saving"
    partial.write_bytes(b"\x93NUMPY half written")
    week_ago = time.time() - 7 * 24 * 3600
    for path in (old, partial):
        os.utime(path, (week_ago, week_ago))
    recent = folder / "responses_stillwriting.npy"  # an ingest in progress: must survive
    recent.write_bytes(live[0].read_bytes())

    report = json.loads(_gc(subprocess_env, "--json").stdout)
    ours = lambda paths: sorted(p.rsplit("/", 1)[-1] for p in paths if f"mouse={unique_mouse}" in p)  # noqa: E731
    assert ours(report["old"]) == sorted([old.name, partial.name]) and ours(report["recent"]) == [recent.name]
    assert old.exists() and partial.exists() and report["deleted"] == 0  # a dry run deletes nothing

    run = _gc(subprocess_env, "--delete")
    assert run.returncode == 0, run.stderr
    assert not old.exists() and not partial.exists() and recent.exists()
    assert all(path.exists() for path in live)
    np.testing.assert_array_equal(exp.load_responses(key), before)  # live data untouched
    recent.unlink()
