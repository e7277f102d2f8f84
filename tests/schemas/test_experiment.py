"""Ingestion round trip, re-ingest, rollback, the CLI and concurrent ingests, on each real backend.

Refusal of bad folders is in test_experiment_bad_folders.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from neureg.errors import ScanExistsError
from neureg.ingestion import ingest_folder, insert_scan
from neureg.ingestion.folder import read_scan_folder
from neureg.models.digests import image_hash
from neureg.upkeep.status import table_counts


def test_round_trip_is_bitwise_equal(pipeline, tmp_path, unique_mouse, scan_folder_factory):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse)
    key = ingest_folder(folder, pipeline)
    exp = pipeline.experiment

    responses = exp.load_responses(key)
    expected = np.stack([np.load(folder / f"data/responses/{t}.npy") for t in range(len(responses))])
    assert responses.dtype == np.float32 and np.array_equal(responses, expected)

    unit_ids = np.load(folder / "meta/neurons/unit_ids.npy")
    assert np.array_equal(exp.unit_ids(key), unit_ids)
    coords = np.load(folder / "meta/neurons/cell_motor_coordinates.npy")
    x, y, z = (exp.Scan.Unit & key).to_arrays("x", "y", "z", order_by="unit_index")
    assert np.array_equal(np.stack([x, y, z], 1), coords)

    trials = exp.load_trials(key)
    behavior = np.stack([np.load(folder / f"data/behavior/{t}.npy") for t in trials["trial_idx"]])
    pupil = np.stack([np.load(folder / f"data/pupil_center/{t}.npy") for t in trials["trial_idx"]])
    assert np.array_equal(trials["behavior"], behavior) and np.array_equal(trials["pupil_center"], pupil)

    pixels = exp.load_images(trials["image_hash"])
    on_disk = np.stack([np.load(folder / f"data/images/{t}.npy") for t in trials["trial_idx"]])
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, on_disk)
    assert all(image_hash(p) == h for p, h in zip(on_disk, trials["image_hash"]))

    frame_ids = np.load(folder / "meta/trials/frame_image_id.npy")
    ids, counts = np.unique(frame_ids, return_counts=True)
    repeated = set(ids[counts > 1])
    assert [t == "oracle" for t in trials["tier"]] == [f in repeated for f in frame_ids]
    assert set(trials["tier"]) <= {"train", "validation", "oracle"}

    scan = (exp.Scan & key).fetch1()
    assert (scan["area"], scan["n_trials"], scan["n_units"]) == ("V1", frame_ids.size, unit_ids.size)
    assert scan["depth"] == pytest.approx(210.5) and scan["frame_rate"] == pytest.approx(7.5)
    start = (exp.Trial & key).to_arrays("start_time", order_by="trial_idx")
    np.testing.assert_array_equal(start, np.arange(frame_ids.size) * 1.5)


def test_ingestion_seals_the_scan_and_records_who_and_when(pipeline, tmp_path, unique_mouse, scan_folder_factory):
    import datetime

    import neureg

    exp = pipeline.experiment
    key = ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse), pipeline)
    who, when, version = (exp.Ingestion & key).fetch1("ingested_by", "ingested_at", "neureg_version")
    assert who == exp.Scan.connection.conn_info["user"] and version == neureg.__version__
    assert abs((datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - when).total_seconds()) < 600
    # The same scan without its ingestion row (rows written by hand, bypassing ingest) is not computed on.
    assert pipeline.oracle.OracleStats.key_source & key
    (exp.Ingestion & key).delete_quick()
    assert not (pipeline.oracle.OracleStats.key_source & key)


def test_shared_images_are_one_row(pipeline, tmp_path, unique_mouse, scan_folder_factory):
    exp = pipeline.experiment
    first = ingest_folder(scan_folder_factory(tmp_path / "a", mouse=unique_mouse, scan=1, seed=7), pipeline)
    before = len(exp.Image())
    second = ingest_folder(scan_folder_factory(tmp_path / "b", mouse=unique_mouse, scan=2, seed=7), pipeline)
    assert len(exp.Image()) == before, "the same pixels in a second scan must not add Image rows"
    assert len(exp.Trial & first) == len(exp.Trial & second)


def test_reingest_is_refused_and_changes_nothing(pipeline, tmp_path, unique_mouse, scan_folder_factory):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse)
    ingest_folder(folder, pipeline)
    before = table_counts(pipeline)
    with pytest.raises(ScanExistsError, match="already in the database"):
        ingest_folder(folder, pipeline)
    assert table_counts(pipeline) == before


def test_failure_inside_the_transaction_rolls_back(pipeline, tmp_path, unique_mouse, scan_folder_factory):
    """A fault after some rows were inserted (here: the responses insert) leaves nothing behind."""
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse)
    data = read_scan_folder(folder)
    exp = pipeline.experiment
    before = table_counts(pipeline)
    original = exp.Responses.insert1

    def failing_insert(*args, **kwargs):
        raise RuntimeError("disk full")

    exp.Responses.insert1 = failing_insert
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            insert_scan(data)
    finally:
        exp.Responses.insert1 = original
    assert table_counts(pipeline) == before


def test_cli_ingest_status_and_errors(pipeline, tmp_path, unique_mouse, scan_folder_factory, subprocess_env):
    good = scan_folder_factory(tmp_path / "good", mouse=unique_mouse)
    bad = scan_folder_factory(tmp_path / "bad", mouse=unique_mouse, scan=2)
    (bad / "data/behavior/0.npy").unlink()

    def neureg(*args):
        return subprocess.run(
            [sys.executable, "-m", "neureg.cli", *args], env=subprocess_env, capture_output=True, text=True
        )

    run = neureg("ingest", str(good))
    assert run.returncode == 0, run.stderr
    run = neureg("ingest", str(bad))
    assert run.returncode != 0 and "behavior" in run.stderr and "missing" in run.stderr
    run = neureg("ingest", str(good))
    assert run.returncode != 0 and "already in the database" in run.stderr
    run = neureg("status", "--json")
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)
    assert counts == table_counts(pipeline)
    scan_table = pipeline.experiment.Scan.full_table_name
    assert counts[scan_table] == len(pipeline.experiment.Scan())


# ------------------------------------------------------------------------------------------ concurrency
def _ingest_together(folders, env, copies=1):
    """Start one `neureg ingest` per folder (x copies) at the same moment; return (exit codes, stderr)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "neureg.cli", "ingest", str(f)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for f in folders
        for _ in range(copies)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outputs]


def test_concurrent_ingests_of_scans_sharing_a_mouse_and_images_all_land(
    pipeline, tmp_path, unique_mouse, scan_folder_factory, subprocess_env
):
    """Same mouse, same session, same images (same seed), different scans: every ingest lands."""
    scans = range(1, 7)
    folders = [scan_folder_factory(tmp_path / f"s{i}", mouse=unique_mouse, scan=i, seed=0) for i in scans]
    codes, errors = _ingest_together(folders, subprocess_env)
    assert codes == [0] * len(scans), errors
    assert "Traceback" not in "".join(errors)
    assert len(pipeline.experiment.Scan & {"mouse": unique_mouse}) == len(scans)
    assert len(pipeline.experiment.Mouse & {"mouse": unique_mouse}) == 1
    for i in scans:
        assert len(pipeline.experiment.Trial & {"mouse": unique_mouse, "scan_idx": i}) == 39


def test_concurrent_ingests_of_one_scan_land_it_once(
    pipeline, tmp_path, unique_mouse, scan_folder_factory, subprocess_env
):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse)
    before = table_counts(pipeline)
    codes, errors = _ingest_together([folder], subprocess_env, copies=3)
    assert sorted(codes) == [0, 3, 3], errors
    assert "Traceback" not in "".join(errors)
    assert sum("already in the database" in e for e in errors) == 2
    after = table_counts(pipeline)
    assert after[pipeline.experiment.Scan.full_table_name] == before[pipeline.experiment.Scan.full_table_name] + 1
    assert len(pipeline.experiment.Trial & {"mouse": unique_mouse}) == 39


def test_concurrent_first_commands_on_a_new_home_all_succeed(tmp_path):
    """`init` and `status` at once on a home that does not exist yet (embedded server, fresh schemas)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    for attempt in range(2):
        env = dict(base, NEUREG_HOME=str(tmp_path / f"home{attempt}"))
        commands = [["init"], ["status", "--json"], ["status"]]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "neureg.cli", *c],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for c in commands
        ]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]


def test_responses_with_a_missing_block_are_an_error_naming_the_trials(
    pipeline, tmp_path, unique_mouse, scan_folder_factory, monkeypatch
):
    """A sealed scan whose blocks do not cover every trial (a row deleted, a block lost) is never loaded
    as a matrix with holes: the error names the scan and the trials, and no oracle statistic is computed."""
    from neureg.errors import StoreIntegrityError

    monkeypatch.setattr("neureg.ingestion.insert.RESPONSE_BLOCK_TRIALS", 10)
    exp = pipeline.experiment
    key = ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=51), pipeline)
    try:
        n_trials = (exp.Scan & key).fetch1("n_trials")
        assert len(exp.Responses.Block & key) == -(-n_trials // 10)
        (exp.Responses.Block & key & {"block_idx": 1}).delete_quick()
        with pytest.raises(StoreIntegrityError, match=rf"{unique_mouse}.*incomplete .*trials 10\.\.19 of {n_trials}"):
            exp.load_responses(key)
        (exp.Responses.Block & key).delete_quick()
        with pytest.raises(StoreIntegrityError, match=rf"trials 0\.\.{n_trials - 1} of {n_trials} trials have no"):
            exp.load_responses(key)
        (exp.Responses & key).delete_quick()
        with pytest.raises(StoreIntegrityError, match="has no Responses row"):
            exp.load_responses(key)
        result = pipeline.oracle.OracleStats.populate(key, suppress_errors=True)
        assert result["error_list"] and not (pipeline.oracle.OracleStats & key)
    finally:  # the suite shares one database: no other test's worker may meet this broken scan
        (exp.Scan & key).delete(prompt=False)
