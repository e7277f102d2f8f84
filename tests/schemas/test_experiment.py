"""Ingestion round trip, refusal of bad folders, re-ingest, on each real backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from neureg.errors import ScanExistsError
from neureg.populate.ingest import ingest_folder
from neureg.populate.status import table_counts
from neureg.scanfolder import ScanFolderError, image_hash, read_scan_folder


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


def _edit(name):
    """Register a corruption: a function (folder) -> None that breaks a valid folder in one way."""

    def register(func):
        BAD_FOLDERS.append(pytest.param(func, id=name))
        return func

    return register


BAD_FOLDERS: list = []


def _meta(folder, **changes):
    path = folder / "scan.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@_edit("no-scan-json")
def _(f):
    (f / "scan.json").unlink()
    return "scan.json: missing"


@_edit("scan-json-not-json")
def _(f):
    (f / "scan.json").write_text("{mouse: m1")
    return "scan.json: not valid JSON"


@_edit("metadata-missing-session")
def _(f):
    _meta(f, session=None)
    return "missing required key(s) ['session']"


@_edit("metadata-bad-date")
def _(f):
    _meta(f, session="01/11/2026")
    return "'session' must be the recording date as YYYY-MM-DD"


@_edit("metadata-scan-not-int")
def _(f):
    _meta(f, scan="one")
    return "'scan' must be an integer"


@_edit("metadata-depth-wrong-type")
def _(f):
    _meta(f, depth="deep")
    return "'depth' has the wrong type"


@_edit("metadata-unknown-key")
def _(f):
    _meta(f, depht=200)
    return "unknown key(s) ['depht']"


@_edit("missing-response-file")
def _(f):
    (f / "data/responses/3.npy").unlink()
    return "data/responses: holds"


@_edit("trial-count-mismatch")
def _(f):
    ids = np.load(f / "meta/trials/frame_image_id.npy")
    np.save(f / "meta/trials/frame_image_id.npy", ids[:-1])
    return "extra trials"


@_edit("response-wrong-length")
def _(f):
    np.save(f / "data/responses/5.npy", np.zeros(3, np.float32))
    return "5.npy: responses (one value per unit, 12 units) has shape (3,)"


@_edit("response-nan")
def _(f):
    r = np.load(f / "data/responses/2.npy")
    r[0] = np.nan
    np.save(f / "data/responses/2.npy", r)
    return "2.npy: responses (one value per unit, 12 units) contains NaN"


@_edit("response-overflows-float32")
def _(f):
    # Finite as float64, inf once stored as float32: must be refused, not stored as inf.
    np.save(f / "data/responses/3.npy", np.full(12, 1e39, np.float64))
    return "responses/3.npy: responses (one value per unit, 12 units) has values beyond the stored float32 range"


@_edit("notes-too-long")
def _(f):
    _meta(f, notes="x" * 4097)
    return "'notes' must be at most 4096 characters"


@_edit("depth-beyond-float32")
def _(f):
    _meta(f, depth=1e39)
    return "'depth' must be a finite non-negative number within float32 range"


@_edit("depth-400-digits")
def _(f):
    (f / "scan.json").write_text((f / "scan.json").read_text().replace('"depth": 210.5', '"depth": ' + "9" * 400))
    return "'depth' must be a finite non-negative number within float32 range"


@_edit("frame-rate-beyond-float32")
def _(f):
    _meta(f, frame_rate=3.5e38)
    return "'frame_rate' must be a finite positive number within float32 range"


@_edit("nul-in-notes")
def _(f):
    _meta(f, notes="left\x00hemisphere")
    return "'notes' contains a NUL character"


@_edit("lone-surrogate")
def _(f):
    (f / "scan.json").write_text((f / "scan.json").read_text().replace('"notes": "test"', '"notes": "a\\ud800b"'))
    return "'notes' is not valid Unicode text"


@_edit("json-nested-deep")
def _(f):
    (f / "scan.json").write_text((f / "scan.json").read_text().rstrip()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return "scan.json: not valid JSON: nested too deeply"


@_edit("json-duplicate-key")
def _(f):
    (f / "scan.json").write_text((f / "scan.json").read_text().rstrip()[:-1] + ', "scan": 9}')
    return "key 'scan' appears twice"


@_edit("mouse-trailing-newline")
def _(f):
    meta = json.loads((f / "scan.json").read_text())
    _meta(f, mouse=meta["mouse"] + "\n")
    return "'mouse' must be 1-32 letters"


@_edit("trial-file-superscript-digit")
def _(f):
    (f / "data/behavior/0.npy").rename(f / "data/behavior/\u00b2.npy")
    return "unexpected file: per-trial files are named <trial>.npy"


@_edit("image-too-wide")
def _(f):
    for t in range(len(list((f / "data/images").iterdir()))):
        np.save(f / f"data/images/{t}.npy", np.zeros((1, 32768), np.uint8))
    return "images must be 1..32767 pixels on each side"


@_edit("image-empty")
def _(f):
    for t in range(len(list((f / "data/images").iterdir()))):
        np.save(f / f"data/images/{t}.npy", np.zeros((0, 0), np.uint8))
    return "images must be 1..32767 pixels on each side"


@_edit("frame-id-beyond-int64")
def _(f):
    ids = np.load(f / "meta/trials/frame_image_id.npy").astype(np.uint64)
    ids[ids == ids.max()] = 2**63
    np.save(f / "meta/trials/frame_image_id.npy", ids)
    return "image ids must fit a signed 64-bit integer"


@_edit("coordinates-complex")
def _(f):
    coords = np.load(f / "meta/neurons/cell_motor_coordinates.npy")
    np.save(f / "meta/neurons/cell_motor_coordinates.npy", coords + 1j)
    return "cell_motor_coordinates.npy: must be numeric (12, 3)"


@_edit("start-time-complex")
def _(f):
    times = np.load(f / "meta/trials/start_time.npy")
    np.save(f / "meta/trials/start_time.npy", times + 0.5j)
    return "trial start times must be real numbers"


@_edit("negative-duration")
def _(f):
    durations = np.load(f / "meta/trials/duration.npy")
    durations[3] = -0.5
    np.save(f / "meta/trials/duration.npy", durations)
    return "trial durations must not be negative"


@_edit("behavior-inf")
def _(f):
    np.save(f / "data/behavior/4.npy", np.array([1.0, np.inf, 0.0], np.float32))
    return "behavior/4.npy: behavior (pupil dilation, derivative, running speed) contains NaN or infinite"


@_edit("duplicate-unit-ids")
def _(f):
    ids = np.load(f / "meta/neurons/unit_ids.npy")
    ids[1] = ids[0]
    np.save(f / "meta/neurons/unit_ids.npy", ids)
    return "unit ids are not unique"


@_edit("image-shape-differs")
def _(f):
    np.save(f / "data/images/6.npy", np.zeros((10, 10), np.uint8))
    return "6.npy: image shape (10, 10) differs"


@_edit("image-not-uint8")
def _(f):
    img = np.load(f / "data/images/7.npy").astype(np.float32)
    np.save(f / "data/images/7.npy", img)
    return "images must all be uint8"


@_edit("same-id-different-pixels")
def _(f):
    ids = np.load(f / "meta/trials/frame_image_id.npy")
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    trial = [t for t in range(ids.size) if ids[t] == ids[first[counts > 1][0]]][1]
    img = np.load(f / f"data/images/{trial}.npy")
    np.save(f / f"data/images/{trial}.npy", 255 - img)
    return "was shown with different pixels"


@_edit("corrupt-npy")
def _(f):
    (f / "data/pupil_center/1.npy").write_bytes(b"not numpy at all")
    return "pupil_center/1.npy: not a readable .npy file"


@_edit("coordinates-wrong-shape")
def _(f):
    np.save(f / "meta/neurons/cell_motor_coordinates.npy", np.zeros((12, 2)))
    return "cell_motor_coordinates.npy: must be numeric (12, 3)"


@_edit("unknown-tier")
def _(f):
    n = np.load(f / "meta/trials/frame_image_id.npy").size
    np.save(f / "meta/trials/tiers.npy", np.array(["train"] * (n - 1) + ["holdout"]))
    return "unknown tier(s) ['holdout']"


@_edit("missing-unit-ids")
def _(f):
    (f / "meta/neurons/unit_ids.npy").unlink()
    return "unit_ids.npy: missing (unit ids)"


@pytest.mark.parametrize("corrupt", BAD_FOLDERS)
def test_bad_folder_is_refused_with_its_own_message(pipeline, tmp_path, unique_mouse, scan_folder_factory, corrupt):
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse)
    expected = corrupt(folder)
    before = table_counts(pipeline)
    with pytest.raises(ScanFolderError) as info:
        ingest_folder(folder, pipeline)
    assert expected in str(info.value)
    assert str(folder) in str(info.value), "the message names the file"
    assert table_counts(pipeline) == before
    assert not (pipeline.experiment.Mouse & {"mouse": unique_mouse})


def test_bad_messages_are_distinct(tmp_path, scan_folder_factory):
    messages = set()
    for i, param in enumerate(BAD_FOLDERS):
        folder = scan_folder_factory(tmp_path / str(i))
        param.values[0](folder)
        with pytest.raises(ScanFolderError) as info:
            read_scan_folder(folder)
        messages.add(info.value.fault.split(":")[0])
    assert len(messages) >= 10


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
            exp.insert_scan(data)
    finally:
        exp.Responses.insert1 = original
    assert table_counts(pipeline) == before


def test_cli_ingest_status_and_errors(pipeline, tmp_path, unique_mouse, scan_folder_factory, subprocess_env):
    good = scan_folder_factory(tmp_path / "good", mouse=unique_mouse)
    bad = scan_folder_factory(tmp_path / "bad", mouse=unique_mouse, scan=2)
    (bad / "data/behavior/0.npy").unlink()

    def neureg(*args):
        return subprocess.run([sys.executable, "-m", "neureg.cli", *args], env=subprocess_env, capture_output=True, text=True)

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
    procs = [subprocess.Popen([sys.executable, "-m", "neureg.cli", "ingest", str(f)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for f in folders for _ in range(copies)]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outputs]


def test_concurrent_ingests_of_scans_sharing_a_mouse_and_images_all_land(pipeline, tmp_path, unique_mouse,
                                                                         scan_folder_factory, subprocess_env):
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


def test_concurrent_ingests_of_one_scan_land_it_once(pipeline, tmp_path, unique_mouse, scan_folder_factory,
                                                     subprocess_env):
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
        procs = [subprocess.Popen([sys.executable, "-m", "neureg.cli", *c], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
