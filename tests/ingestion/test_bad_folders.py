"""Refusal of bad scan folders: each fault gets its own message naming the file, and nothing is inserted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from neureg.errors import ScanFolderError
from neureg.ingestion import ingest_folder
from neureg.ingestion.folder import read_scan_folder
from neureg.upkeep.status import table_counts

BAD_FOLDERS: list = []  # pytest params of corruptions: functions (folder) -> expected message


def _edit(name):
    """Register a corruption: a function (folder) -> expected message that breaks a valid folder in one way."""

    def register(func):
        BAD_FOLDERS.append(pytest.param(func, id=name))
        return func

    return register


def _meta(folder, **changes):
    """Set scan.json keys (None removes one)."""
    path = folder / "scan.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _meta_edit(name, expected, **changes):
    """Register a corruption that changes scan.json's keys (None removes one)."""

    def corrupt(folder):
        _meta(folder, **changes)
        return expected

    _edit(name)(corrupt)


def _text_edit(name, expected, edit):
    """Register a corruption of scan.json's text (for faults JSON values cannot express)."""

    def corrupt(folder):
        path = folder / "scan.json"
        path.write_text(edit(path.read_text()))
        return expected

    _edit(name)(corrupt)


_text_edit("scan-json-not-json", "scan.json: not valid JSON", lambda text: "{mouse: m1")
_meta_edit("metadata-missing-session", "no session for this scan", session=None)
_meta_edit("metadata-session-is-a-date", "'session' must be the session number", session="2026-11-01")
_meta_edit("metadata-bad-date", "'date' must be the recording date as YYYY-MM-DD", date="01/11/2026")
_meta_edit("metadata-impossible-date", "'date' must be the recording date as YYYY-MM-DD", date="2026-02-30")
_meta_edit("metadata-scan-not-int", "'scan' must be an integer", scan="one")
_meta_edit("metadata-depth-wrong-type", "'depth' has the wrong type", depth="deep")
_meta_edit("metadata-unknown-key", "unknown key(s) ['depht']", depht=200)
_meta_edit("notes-too-long", "'notes' must be at most 4096 characters", notes="x" * 4097)
_meta_edit("depth-beyond-float32", "'depth' must be a finite non-negative number within float32 range", depth=1e39)
_text_edit(
    "depth-400-digits",
    "'depth' must be a finite non-negative number within float32 range",
    lambda text: text.replace('"depth": 210.5', '"depth": ' + "9" * 400),
)
_meta_edit(
    "frame-rate-beyond-float32", "'frame_rate' must be a finite positive number within float32 range", frame_rate=3.5e38
)
_meta_edit("nul-in-notes", "'notes' contains a NUL character", notes="left\x00hemisphere")
_text_edit(
    "lone-surrogate",
    "'notes' is not valid Unicode text",
    lambda text: text.replace('"notes": "test"', '"notes": "a\\ud800b"'),
)
_text_edit(
    "json-nested-deep",
    "scan.json: not valid JSON: nested too deeply",
    lambda text: text.rstrip()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
)
_text_edit("json-duplicate-key", "key 'scan' appears twice", lambda text: text.rstrip()[:-1] + ', "scan": 9}')


@_edit("no-scan-json-and-no-identity")
def _(f):
    (f / "scan.json").unlink()  # nothing else names the scan: no identity files, no static<...> folder name
    return "no mouse, session, scan for this scan"


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


@_edit("image-beyond-0-255")
def _(f):
    img = np.load(f / "data/images/7.npy").astype(np.float32) * 2.0 + 1.0  # float images hold 0..255
    np.save(f / "data/images/7.npy", img)
    return "7.npy: image values must be finite and within 0..255"


@_edit("image-complex")
def _(f):
    np.save(f / "data/images/7.npy", np.load(f / "data/images/7.npy").astype(np.complex64))
    return "7.npy: images must be uint8 or real numbers in 0..255"


@_edit("identity-files-disagree-with-scan-json")
def _(f):
    np.save(f / "meta/trials/animal_id.npy", np.full(len(np.load(f / "meta/trials/frame_image_id.npy")), 777))
    return "mouse disagrees: scan.json says"


@_edit("identity-file-names-two-scans")
def _(f):
    n = len(np.load(f / "meta/trials/frame_image_id.npy"))
    np.save(f / "meta/trials/scan_idx.npy", np.arange(n) % 2)
    return "scan_idx.npy: meta/trials/scan_idx.npy names several values"


@_edit("trial-ids-not-unique")
def _(f):
    np.save(f / "meta/trials/trial_idx.npy", np.zeros(len(np.load(f / "meta/trials/frame_image_id.npy")), int))
    return "trial_idx.npy: trial ids must be unique"


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


def _n_trials(f) -> int:
    return np.load(f / "meta/trials/frame_image_id.npy").size


@_edit("identity-file-nan")
def _(f):
    np.save(f / "meta/trials/session.npy", np.full(_n_trials(f), np.nan))
    return "meta/trials/session.npy holds NaN or infinity"


@_edit("identity-file-infinity")
def _(f):
    np.save(f / "meta/neurons/animal_ids.npy", np.full(12, np.inf))
    return "meta/neurons/animal_ids.npy holds NaN or infinity"


def _trial_ids(f, ids):
    np.save(f / "meta/trials/trial_idx.npy", np.asarray(ids))


@_edit("trial-id-nul-in-the-middle")
def _(f):
    ids = [f"t{i}" for i in range(_n_trials(f))]
    ids[len(ids) // 2] = "t\x00x"
    _trial_ids(f, ids)
    return f"trial id of trial {len(ids) // 2}' contains a NUL character"


@_edit("trial-id-lone-surrogate-in-the-middle")
def _(f):
    ids = [f"t{i}" for i in range(_n_trials(f))]
    ids[5] = "t\ud800"
    _trial_ids(f, ids)
    return "'trial id of trial 5' is not valid Unicode text"


@_edit("trial-id-beyond-int64")
def _(f):
    _trial_ids(f, np.arange(_n_trials(f), dtype=np.uint64) + np.uint64(2**63))
    return "trial ids must fit a signed 64-bit integer"


@_edit("trial-id-bytes-not-text")
def _(f):
    _trial_ids(f, np.array([b"\xff%d" % i for i in range(_n_trials(f))]))
    return "trial ids are not readable as text"


@_edit("scan-json-is-a-fifo")
def _(f):
    (f / "scan.json").unlink()
    os.mkfifo(f / "scan.json")
    return "scan.json: not a regular file (scan metadata)"


@_edit("response-file-is-a-fifo")
def _(f):
    (f / "data/responses/4.npy").unlink()
    os.mkfifo(f / "data/responses/4.npy")
    return "responses/4.npy: not a regular file"


@_edit("response-file-links-to-dev-zero")
def _(f):
    (f / "data/responses/2.npy").unlink()
    (f / "data/responses/2.npy").symlink_to("/dev/zero")
    return "responses/2.npy: not a regular file"


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
