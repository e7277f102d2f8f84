"""The scan-folder format that lab members bring, and its validation.

One folder per scan, in the layout the mouse-V1 community publishes (Sensorium 2022, Lurz et al. 2021;
docs/ingestion.md has the whole mapping)::

    scan.json                              optional: mouse, session (number), scan, date (YYYY-MM-DD), area,
                                           depth, frame_rate, notes (identity may come from the files instead)
    data/images/<trial>.npy                (H, W) or (1, H, W): uint8, or float holding 0..255
    data/responses/<trial>.npy             (n_units,) float: one value per unit
    data/behavior/<trial>.npy              (3,): pupil dilation, its derivative, running speed
    data/pupil_center/<trial>.npy          (2,): pupil centre x, y
    meta/trials/frame_image_id.npy         (n_trials,) int: repeated images share an id
    meta/trials/tiers.npy                  optional (n_trials,) str: train / validation / test / final_test / oracle
    meta/trials/trial_idx.npy              optional (n_trials,): the real presentation order (int, or hashed str)
    meta/trials/{animal_id,session,scan_idx}.npy   optional identity (see identity.py)
    meta/trials/start_time.npy             optional (n_trials,) float seconds from scan start
    meta/trials/duration.npy               optional (n_trials,) float seconds
    meta/neurons/unit_ids.npy              (n_units,) int, unique
    meta/neurons/cell_motor_coordinates.npy  (n_units, 3) float, cortical position in um
    meta/neurons/area.npy, layer.npy       optional (n_units,) str

Trial files are numbered 0..n_trials-1 (in any order of presentation) and every per-trial folder holds
exactly those files. Reading never
touches the database: ``read_scan_folder`` validates *everything* and returns a ``ScanData`` or raises
``ScanFolderError`` naming the file and the fault, so ingestion can insert in one transaction afterwards.
The checks of each file live in ``validation``, the scan's identity in ``identity``.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScanFolderError
from ..models.digests import image_hash
from .identity import resolve_identity
from .validation import (
    SMALLINT_LIMIT,
    as_text,
    check_memory,
    check_text,
    check_trial_files,
    load_array,
    optional_trial_array,
    per_trial,
    read_frame_ids,
    read_meta,
    read_units,
)

__all__ = ["TIERS", "ScanData", "assign_tiers", "read_scan_folder", "write_scan_folder"]

TIERS = ("train", "validation", "test", "final_test", "oracle")
HELD_OUT_TIERS = ("test", "final_test")  # competition scans withhold these tiers' responses as zeros
IMAGE_SIDE_MAX = SMALLINT_LIMIT - 1  # Image.height / width are int16
VALIDATION_FRACTION = 0.1  # share of non-repeated images put in the validation tier when tiers.npy is absent


@dataclass
class ScanData:
    """A validated scan, ready to insert. Arrays are indexed by trial (rows) and unit (columns)."""

    mouse: str
    session: int
    scan: int
    session_date: _dt.date | None
    area: str
    depth: float
    frame_rate: float
    notes: str
    unit_ids: np.ndarray  # (n_units,) int64
    unit_positions: np.ndarray  # (n_units, 3) float64
    unit_areas: np.ndarray  # (n_units,) str
    unit_layers: np.ndarray  # (n_units,) str ('' when unknown)
    images: Mapping[str, np.ndarray]  # image hash -> uint8 (H, W), read from its file when asked (ImageFiles)
    image_source_ids: dict[str, int]  # image hash -> frame_image_id
    trial_images: list[str]  # (n_trials,) image hash per trial
    tiers: np.ndarray  # (n_trials,) str
    start_time: np.ndarray  # (n_trials,) float64, NaN when unknown
    duration: np.ndarray  # (n_trials,) float64, NaN when unknown
    responses: np.ndarray  # (n_trials, n_units) float32
    behavior: np.ndarray  # (n_trials, 3) float64: BEHAVIOR_COLUMNS
    pupil_center: np.ndarray  # (n_trials, 2) float64
    frame_ids: np.ndarray  # (n_trials,) int64: frame_image_id exactly as the files give it
    trial_labels: np.ndarray  # (n_trials,) str: the recording's own trial_idx ('' when absent)
    presentation: list  # (n_trials,) int trial_idx as the files give it (the real order), None when not an integer
    withheld: np.ndarray  # (n_trials,) bool: responses held out (all zero in a test tier)
    extra: dict = field(default_factory=dict)

    @property
    def n_trials(self) -> int:
        return self.responses.shape[0]

    @property
    def n_units(self) -> int:
        return self.responses.shape[1]

    @property
    def key(self) -> dict:
        return {"mouse": self.mouse, "session": self.session, "scan_idx": self.scan}


# ----------------------------------------------------------------------------------------- writing
def write_scan_folder(
    path: Path | str,
    meta: dict,
    images: np.ndarray,
    responses: np.ndarray,
    behavior: np.ndarray,
    pupil_center: np.ndarray,
    frame_image_id: np.ndarray,
    unit_ids: np.ndarray,
    cell_motor_coordinates: np.ndarray,
    tiers: np.ndarray | None = None,
    areas: np.ndarray | None = None,
    start_time: np.ndarray | None = None,
    duration: np.ndarray | None = None,
) -> Path:
    """Write one scan folder. ``images`` is (n_trials, H, W) uint8: the image shown on each trial."""
    root = Path(path)
    for sub in ("data/images", "data/responses", "data/behavior", "data/pupil_center", "meta/trials", "meta/neurons"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    if isinstance(meta.get("date"), _dt.date):
        meta["date"] = meta["date"].isoformat()
    (root / "scan.json").write_text(json.dumps(meta, indent=2) + "\n")
    for trial in range(len(responses)):
        np.save(root / "data/images" / f"{trial}.npy", np.asarray(images[trial], dtype=np.uint8))
        np.save(root / "data/responses" / f"{trial}.npy", np.asarray(responses[trial], dtype=np.float32))
        np.save(root / "data/behavior" / f"{trial}.npy", np.asarray(behavior[trial], dtype=np.float32))
        np.save(root / "data/pupil_center" / f"{trial}.npy", np.asarray(pupil_center[trial], dtype=np.float32))
    np.save(root / "meta/trials/frame_image_id.npy", np.asarray(frame_image_id, dtype=np.int64))
    np.save(root / "meta/neurons/unit_ids.npy", np.asarray(unit_ids, dtype=np.int64))
    np.save(root / "meta/neurons/cell_motor_coordinates.npy", np.asarray(cell_motor_coordinates, dtype=np.float64))
    if tiers is not None:
        np.save(root / "meta/trials/tiers.npy", np.asarray(tiers, dtype=str))
    if areas is not None:
        np.save(root / "meta/neurons/area.npy", np.asarray(areas, dtype=str))
    if start_time is not None:
        np.save(root / "meta/trials/start_time.npy", np.asarray(start_time, dtype=np.float64))
    if duration is not None:
        np.save(root / "meta/trials/duration.npy", np.asarray(duration, dtype=np.float64))
    return root


# ----------------------------------------------------------------------------------------- reading
def read_scan_folder(path: Path | str, names: list[tuple[str, str]] | None = None) -> ScanData:
    """Validate a whole scan folder and return it in memory; raise ``ScanFolderError`` on the first fault.

    ``names`` are the (what, name) pairs it was published under (its folder's, a zip's), for the identity
    they may carry; by default the folder's own name.
    """
    root = Path(path)
    if not root.is_dir():
        raise ScanFolderError(root, "not a directory (expected a scan folder with data/ and meta/)")
    meta = read_meta(root)
    mouse, session, scan = resolve_identity(root, names or [("the folder name", root.name)], meta)
    unit_ids, unit_positions, unit_areas = read_units(root, meta["area"])
    n_units = unit_ids.size
    unit_layers = _unit_layers(root, n_units)
    frame_image_id = read_frame_ids(root)
    n_trials = frame_image_id.size
    check_memory(root, n_trials, n_units)
    check_trial_files(root, n_trials)

    tiers_in = optional_trial_array(root / "meta/trials/tiers.npy", n_trials, "tiers")
    if tiers_in is not None:
        tiers_in = as_text(tiers_in, root / "meta/trials/tiers.npy", "tiers")
        bad = sorted(set(tiers_in.tolist()) - set(TIERS))
        if bad:
            raise ScanFolderError(root / "meta/trials/tiers.npy", f"unknown tier(s) {bad}; allowed: {list(TIERS)}")
    start_time = optional_trial_array(root / "meta/trials/start_time.npy", n_trials, "trial start times", numeric=True)
    duration = optional_trial_array(root / "meta/trials/duration.npy", n_trials, "trial durations", numeric=True)
    if duration is not None and np.any(duration < 0):
        raise ScanFolderError(root / "meta/trials/duration.npy", "trial durations must not be negative")
    trial_labels, presentation = _trial_order(root, n_trials)

    images, source_ids, trial_images = _read_images(root, frame_image_id)
    responses = np.empty((n_trials, n_units), dtype=np.float32)  # float32 by design: 8000 units x 6000 trials
    per_trial(root, "responses", n_trials, (n_units,), f"responses (one value per unit, {n_units} units)", responses)
    behavior = np.empty((n_trials, 3), dtype=np.float64)
    per_trial(root, "behavior", n_trials, (3,), "behavior (pupil dilation, derivative, running speed)", behavior)
    pupil_center = np.empty((n_trials, 2), dtype=np.float64)
    per_trial(root, "pupil_center", n_trials, (2,), "pupil centre (x, y)", pupil_center)
    withheld = np.zeros(n_trials, dtype=bool)
    if tiers_in is not None:  # competition scans: the held-out tiers' responses are published as zeros
        withheld = np.isin(tiers_in, HELD_OUT_TIERS) & ~np.any(responses, axis=1)

    areas = set(unit_areas.tolist())
    unknown_times = np.full(n_trials, np.nan)
    return ScanData(
        mouse=mouse,
        session=session,
        scan=scan,
        session_date=meta["date"],
        area=meta["area"] or (areas.pop() if len(areas) == 1 else ""),
        depth=meta["depth"],
        frame_rate=meta["frame_rate"],
        notes=meta["notes"],
        unit_ids=unit_ids,
        unit_positions=unit_positions,
        unit_areas=unit_areas,
        unit_layers=unit_layers,
        images=images,
        image_source_ids=source_ids,
        trial_images=trial_images,
        frame_ids=frame_image_id,
        tiers=assign_tiers(trial_images, tiers_in),
        start_time=unknown_times if start_time is None else start_time,
        duration=unknown_times if duration is None else duration,
        responses=responses,
        behavior=behavior,
        pupil_center=pupil_center,
        trial_labels=trial_labels,
        presentation=presentation,
        withheld=withheld,
    )


def _unit_layers(root: Path, n_units: int) -> np.ndarray:
    """meta/neurons/layer.npy as text (e.g. 'L2/3'), '' per unit when absent."""
    path = root / "meta/neurons/layer.npy"
    if not path.exists():
        return np.full(n_units, "", dtype=object).astype(str)
    layers = np.atleast_1d(load_array(path, "unit layers"))
    if layers.shape != (n_units,):
        raise ScanFolderError(path, f"must have one layer per unit ({n_units}), got shape {layers.shape}")
    layers = as_text(layers, path, "unit layers")
    if any(len(layer) > 32 for layer in layers):
        raise ScanFolderError(path, "layer names must be at most 32 characters")
    for layer in set(layers.tolist()):
        check_text(path, "unit layer", layer)
    return layers


def _trial_order(root: Path, n_trials: int) -> tuple[np.ndarray, list]:
    """meta/trials/trial_idx.npy: each trial's own id as text, and as an exact integer when it is one (the
    real presentation order; competition scans hash it to 32 hex digits, which keep only their text).
    Integers never pass through float64, which would merge ids beyond 2^53."""
    path = root / "meta/trials/trial_idx.npy"
    values = optional_trial_array(path, n_trials, "trial ids")
    if values is None:
        return np.full(n_trials, "", dtype=object).astype(str), [None] * n_trials
    labels = as_text(values, path, "trial ids")
    if any(len(label) > 64 for label in labels) or len(set(labels.tolist())) != n_trials:
        raise ScanFolderError(path, "trial ids must be unique and at most 64 characters each")
    for trial, label in enumerate(labels.tolist()):
        check_text(path, f"trial id of trial {trial}", label)
    if not np.issubdtype(values.dtype, np.integer):
        return labels, [None] * n_trials
    numbers = values.tolist()  # Python ints: exact whatever the dtype (uint64 included)
    int64 = np.iinfo(np.int64)
    if min(numbers) < int64.min or max(numbers) > int64.max:
        raise ScanFolderError(path, "trial ids must fit a signed 64-bit integer (|id| < 2^63)")
    return labels, numbers


def _as_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """An image as stored: uint8 as is; floats holding 0..255 exactly as uint8, other floats rounded.

    Non-integral values (the older, downsampled sets) are rounded half to even and clipped to 0..255: one
    rule for every scan, so the same stimulus is the same pixels, and one Image row, wherever it was shown.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating) and not np.issubdtype(pixels.dtype, np.integer):
        raise ScanFolderError(path, f"images must be uint8 or real numbers in 0..255, got dtype {pixels.dtype}")
    if not np.all(np.isfinite(pixels)) or pixels.min() < -0.5 or pixels.max() > 255.5:
        raise ScanFolderError(path, "image values must be finite and within 0..255")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class ImageFiles(Mapping):
    """The scan's distinct images by hash, each read from the file of its first trial when asked.

    Reading keeps only hashes: a Sensorium scan's images are about 1 GB as float32 files and 190 MB as
    uint8, and ingestion inserts them in batches, so they never sit in memory at once. A file that no
    longer gives the pixels it was validated with (changed meanwhile) is refused, naming it.
    """

    def __init__(self, root: Path, first_trial: dict[str, int]):
        self.root, self.first_trial = root, first_trial

    def __getitem__(self, digest: str) -> np.ndarray:
        path = self.root / "data/images" / f"{self.first_trial[digest]}.npy"
        pixels = _as_uint8(_plane(load_array(path, "image"), path), path)
        if image_hash(pixels) != digest:
            raise ScanFolderError(path, "the image changed on disk while the scan was being ingested")
        return pixels

    def __iter__(self):
        return iter(self.first_trial)

    def __len__(self) -> int:
        return len(self.first_trial)


def _plane(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(1, H, W) or (H, W) as (H, W)."""
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise ScanFolderError(path, f"images must be (H, W) or (1, H, W), got {pixels.shape}")
    return pixels


def _read_images(root: Path, frame_image_id: np.ndarray) -> tuple[ImageFiles, dict[str, int], list[str]]:
    """data/images, one file at a time: one shape, the same id always the same pixels. Returns the distinct
    images (``ImageFiles``), the lab's frame id of each, and the hash shown on each trial; no pixels are kept."""
    first_trial: dict[str, int] = {}
    source_ids: dict[str, int] = {}
    id_to_hash: dict[int, str] = {}
    trial_images: list[str] = []
    first_shape = None
    for trial in range(frame_image_id.size):
        path = root / "data/images" / f"{trial}.npy"
        pixels = _plane(load_array(path, "image"), path)
        if first_shape is None:
            first_shape = pixels.shape
            if min(first_shape) < 1 or max(first_shape) > IMAGE_SIDE_MAX:
                raise ScanFolderError(
                    path, f"images must be 1..{IMAGE_SIDE_MAX} pixels on each side, got {first_shape}"
                )
        if pixels.shape != first_shape:
            raise ScanFolderError(path, f"image shape {pixels.shape} differs from trial 0's {first_shape}")
        digest = image_hash(_as_uint8(pixels, path))
        frame_id = int(frame_image_id[trial])
        if id_to_hash.setdefault(frame_id, digest) != digest:
            raise ScanFolderError(
                path, f"frame_image_id {frame_id} was shown with different pixels on an earlier trial"
            )
        if digest not in first_trial:
            first_trial[digest] = trial
            source_ids[digest] = frame_id
        trial_images.append(digest)
    return ImageFiles(root, first_trial), source_ids, trial_images


def assign_tiers(trial_images: list[str], given: np.ndarray | None = None) -> np.ndarray:
    """Repeated images are the oracle set; the rest keep the lab's tiers or get a split fixed by the image.

    The default split is a function of the image hash alone, so an image shown in several scans is in the
    same tier everywhere and no test image leaks into another scan's training set.
    """
    hashes, counts = np.unique(np.asarray(trial_images), return_counts=True)
    repeated = set(hashes[counts > 1].tolist())
    tiers = np.empty(len(trial_images), dtype=object)
    for trial, digest in enumerate(trial_images):
        if given is not None and given[trial] == "final_test":
            tiers[trial] = "final_test"  # the competition's second held-out set: kept apart from the oracle set
        elif digest in repeated:
            tiers[trial] = "oracle"
        elif given is not None:
            tiers[trial] = str(given[trial])
        else:
            in_validation = int(digest[:8], 16) % 1000 < VALIDATION_FRACTION * 1000
            tiers[trial] = "validation" if in_validation else "train"
    return tiers.astype(str)
