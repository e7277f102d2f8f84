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


def _unsealed_scan_with_a_bad_reference(exp, mouse: str) -> dict:
    """What a careless lab member leaves: their own unsealed scan whose block row holds a reference that is
    no path (``"path": [...]``), written by hand past DataJoint's codec."""
    key = {"mouse": mouse, "session": 1, "scan_idx": 9}
    exp.Mouse.insert1({"mouse": mouse}, skip_duplicates=True)
    exp.Session.insert1({"mouse": mouse, "session": 1}, skip_duplicates=True)
    exp.Scan.insert1(dict(key, n_trials=2, n_units=1))
    exp.Responses.insert1(dict(key, n_blocks=1))
    bad = json.dumps({"path": ["not", "a", "path"], "store": "neureg", "shape": [2, 1], "dtype": "float32"})
    exp.Responses.connection.query(
        f"INSERT INTO {exp.Responses.Block.full_table_name} "
        "(mouse, session, scan_idx, block_idx, first_trial, responses, responses_sha256) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        args=(mouse, 1, 9, 0, 0, bad, "0" * 64),
    )
    return key


def test_a_reference_gc_cannot_read_stops_it_and_every_block_stays(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, subprocess_env
):
    exp = pipeline.experiment
    key = ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=22), pipeline)
    store = pipeline.home / "store"
    blocks = sorted(store.rglob("*.npy"))
    assert blocks
    week_ago = time.time() - 7 * 24 * 3600
    for path in blocks:  # every file old enough to be deleted, were it an orphan
        os.utime(path, (week_ago, week_ago))
    bad_key = _unsealed_scan_with_a_bad_reference(exp, unique_mouse + "x")
    try:
        for args in ((), ("--delete",), ("--delete", "--json")):
            run = _gc(subprocess_env, *args)
            assert run.returncode == 1, run.stdout + run.stderr
            assert "gc deletes nothing while a reference is in doubt" in run.stderr
            assert "responses__block" in run.stderr and unique_mouse + "x" in run.stderr, "the message names the row"
            assert "Traceback" not in run.stderr
        assert all(path.exists() for path in blocks), "not one block was deleted"
        np.testing.assert_array_equal(exp.load_responses(key).shape, (exp.Scan & key).fetch1("n_trials", "n_units"))
    finally:
        (exp.Responses.Block & bad_key).delete_quick()
        (exp.Responses & bad_key).delete_quick()
        (exp.Scan & bad_key).delete_quick()


def test_delete_says_what_it_removes_before_it_does(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, subprocess_env
):
    ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=23), pipeline)
    live = sorted((pipeline.home / "store").rglob(f"mouse={unique_mouse}/**/*.npy"))
    orphan = live[0].parent / "responses_leftover.npy"
    orphan.write_bytes(b"x" * 4096)
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(orphan, (week_ago, week_ago))
    run = _gc(subprocess_env, "--delete")
    assert run.returncode == 0, run.stderr
    announced = [line for line in run.stderr.splitlines() if line.startswith("deleting ")]
    assert any(line.endswith("responses_leftover.npy") for line in announced)
    assert any("orphaned file(s)," in line and "MB" in line for line in announced)
    assert not orphan.exists() and all(path.exists() for path in live)
