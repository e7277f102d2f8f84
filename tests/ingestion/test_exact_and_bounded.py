"""Ids kept exactly as the files give them, a session's date never silently contradicted, and a scan too
large for the machine refused before its responses are read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neureg.errors import ScanFolderError, StoreIntegrityError
from neureg.ingestion import ingest_folder
from neureg.upkeep.status import table_counts


def test_trial_ids_beyond_2_to_the_53_stay_distinct_and_exact(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=41)
    n = np.load(folder / "meta/trials/frame_image_id.npy").size
    ids = np.int64(2**53) + np.arange(n, dtype=np.int64)  # float64 would merge neighbours
    np.save(folder / "meta/trials/trial_idx.npy", ids)
    key = ingest_folder(folder, pipeline)
    trial_idx, presentation, recorded = (pipeline.experiment.Trial & key).to_arrays(
        "trial_idx", "presentation", "recorded_trial", order_by="trial_idx"
    )
    assert [int(p) for p in presentation] == ids.tolist()
    assert list(recorded) == [str(i) for i in ids.tolist()]


def test_frame_ids_that_share_pixels_keep_their_own_ids(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=42)
    frame_ids = np.load(folder / "meta/trials/frame_image_id.npy")
    ids, counts = np.unique(frame_ids, return_counts=True)
    a, b = ids[counts == 1][:2]  # two images shown once each
    trial_a, trial_b = int(np.flatnonzero(frame_ids == a)[0]), int(np.flatnonzero(frame_ids == b)[0])
    np.save(folder / f"data/images/{trial_b}.npy", np.load(folder / f"data/images/{trial_a}.npy"))
    key = ingest_folder(folder, pipeline)
    rows = (pipeline.experiment.Trial & key).to_dicts(order_by="trial_idx")
    assert [r["frame_image_id"] for r in rows] == frame_ids.tolist(), "every trial keeps the id its files gave"
    assert rows[trial_a]["image_hash"] == rows[trial_b]["image_hash"], "the shared pixels are one Image row"


def test_a_session_date_that_contradicts_the_database_is_exit_2(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, neureg_cli
):
    first = scan_folder_factory(tmp_path / "a", mouse=unique_mouse, scan=1, seed=43)
    second = scan_folder_factory(tmp_path / "b", mouse=unique_mouse, scan=2, seed=44)
    for folder, date in ((first, "2026-01-05"), (second, "2026-02-07")):
        meta = json.loads((folder / "scan.json").read_text())
        (folder / "scan.json").write_text(json.dumps(dict(meta, date=date)))
    ingest_folder(first, pipeline)
    before = table_counts(pipeline)
    run = neureg_cli("ingest", str(second))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"session {unique_mouse} / 1 is in the database as recorded on 2026-01-05" in run.stderr
    assert "scan(s) [1] ingested by" in run.stderr and "this scan says 2026-02-07" in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(second) in errors[0]
    assert table_counts(pipeline) == before


def test_a_scan_too_large_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """2,000,000 units x 5000 trials: 37 GiB of float32, refused from its meta files alone (no trial files)."""
    root = tmp_path / "huge"
    (root / "meta/neurons").mkdir(parents=True)
    (root / "meta/trials").mkdir(parents=True)
    (root / "scan.json").write_text(json.dumps({"mouse": "big", "session": 1, "scan": 1}))
    np.save(root / "meta/neurons/unit_ids.npy", np.arange(2_000_000, dtype=np.int32))
    np.save(root / "meta/neurons/cell_motor_coordinates.npy", np.zeros((2_000_000, 3), np.float32))
    np.save(root / "meta/trials/frame_image_id.npy", np.arange(5000, dtype=np.int64))
    monkeypatch.setenv("NEUREG_INGEST_MEMORY_GB", "16")
    with pytest.raises(ScanFolderError) as info:
        ingest_folder(root)
    message = str(info.value)
    assert str(root) in message and "2000000 units x 5000 trials" in message
    assert "needs about 41.0 GiB of memory" in message and "is available here" in message


def test_mouse_names_that_differ_in_case_are_two_mice(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    """On MySQL too (a binary collation): 'SIM_M1' and 'sim_m1' are two animals, as on PostgreSQL."""
    upper, lower = unique_mouse.upper(), unique_mouse.lower()
    a = ingest_folder(scan_folder_factory(tmp_path / "a", mouse=upper, seed=45), pipeline)
    b = ingest_folder(scan_folder_factory(tmp_path / "b", mouse=lower, seed=46), pipeline)
    exp = pipeline.experiment
    assert a["mouse"] == upper and b["mouse"] == lower
    assert len(exp.Mouse & [{"mouse": upper}, {"mouse": lower}]) == 2
    assert (exp.Scan & a).fetch1("mouse") == upper and len(exp.Scan & {"mouse": lower}) == 1


def test_an_image_row_cannot_squat_a_content_hash(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    """Black pixels under the hash of a colleague's future stimulus: refused at insert (through DataJoint),
    and a row already there with other pixels (written past DataJoint) makes her ingest exit 2, not reuse it."""
    from neureg.models.digests import image_hash

    exp = pipeline.experiment
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=47)
    victim = np.load(folder / "data/images/0.npy")
    digest = image_hash(victim)
    black = np.zeros_like(victim)
    with pytest.raises(ValueError, match="hash to .*, not to its key"):
        exp.Image.insert1(
            dict(image_hash=digest, source_id=0, height=black.shape[0], width=black.shape[1], pixels=black)
        )
    assert not (exp.Image & {"image_hash": digest})
    # past the check (a raw INSERT would do the same): a squatted row, then the real ingest
    dj_insert = super(type(exp.Image()), exp.Image())
    dj_insert.insert(
        [dict(image_hash=digest, source_id=0, height=black.shape[0], width=black.shape[1], pixels=black.tobytes())]
    )
    before = table_counts(pipeline)
    try:
        with pytest.raises(StoreIntegrityError, match=f"Image {digest}: its pixels do not hash to its key"):
            exp.load_images([digest])  # every read hashes again: no stage computes on the squatted pixels
        with pytest.raises(ScanFolderError, match=f"image {digest} is already in the database with other pixels"):
            ingest_folder(folder, pipeline)
        assert table_counts(pipeline) == before and not (exp.Scan & {"mouse": unique_mouse})
    finally:
        (exp.Image & {"image_hash": digest}).delete_quick()


def test_a_squatted_scan_row_is_exit_2_and_never_counted(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, neureg_cli, monkeypatch
):
    """An unsealed Scan row put in by hand under a colleague's future key: her ingest is refused naming it,
    and neither `scanset --all` nor `plan paper` counts the row as a scan."""
    from neureg.experiments.paper import usable_scans

    exp = pipeline.experiment
    key = {"mouse": unique_mouse, "session": 1, "scan_idx": 1}
    exp.Mouse.insert1({"mouse": unique_mouse})
    exp.Session.insert1({"mouse": unique_mouse, "session": 1})
    exp.Scan.insert1(dict(key, n_trials=2, n_units=1))
    try:
        assert key not in usable_scans(exp)[0]
        run = neureg_cli("ingest", str(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=48)))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert f"scan {unique_mouse} / 1 / scan 1 is taken by an unsealed row" in run.stderr
        import neureg.upkeep.scansets as scansets

        groups = []
        monkeypatch.setattr(scansets, "register_sets", lambda pipeline, asked: groups.extend(asked))
        scansets.register_all(pipeline)  # what `neureg scanset --all` asks for, not registered here
        ((members, note),) = groups
        assert key not in members and note == f"all {len(members)} ingested scans"
        with pytest.raises(ValueError, match="not sealed"):
            exp.ScanSet.create([key])
    finally:
        (exp.Scan & key).delete_quick()


def test_a_scan_set_registered_with_other_members_is_refused(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    """The set `scanset --all` will create next, pre-registered under its future key with chosen members."""
    from neureg.models.digests import stable_hash

    exp = pipeline.experiment
    a = ingest_folder(scan_folder_factory(tmp_path / "a", mouse=unique_mouse, scan=1, seed=49), pipeline)
    b = ingest_folder(scan_folder_factory(tmp_path / "b", mouse=unique_mouse, scan=2, seed=50), pipeline)
    c = ingest_folder(scan_folder_factory(tmp_path / "c", mouse=unique_mouse, scan=3, seed=51), pipeline)
    future = {"scan_set": stable_hash(sorted((k["mouse"], k["session"], k["scan_idx"]) for k in (a, b, c)))}
    exp.ScanSet.insert1(dict(future, n_scans=3, scan_set_note="squatted"))
    exp.ScanSet.Member.insert([dict(future, **a), dict(future, **b)])
    try:
        with pytest.raises(ValueError, match=f"scan set {future['scan_set']} holds 2 member"):
            exp.ScanSet.create([a, b, c])
        with pytest.raises(ValueError, match="altered or forged"):
            exp.set_members(future)
        honest = exp.ScanSet.create([a, b])
        assert [m["scan_idx"] for m in (exp.ScanSet & honest).members()] == [1, 2]
    finally:  # the suite shares one database: no other test's populate should meet these sets
        for set_key in (future, {"scan_set": stable_hash([(unique_mouse, 1, 1), (unique_mouse, 1, 2)])}):
            (exp.ScanSet.Member & set_key).delete_quick()
            (exp.ScanSet & set_key).delete_quick()
