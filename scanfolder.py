"""The scan-folder format that lab members bring, and its validation.

One folder per scan, in the layout the mouse-V1 community already uses (README, "Ingesting a scan")::

    scan.json                              mouse, session (YYYY-MM-DD), scan; optional area, depth, frame_rate, notes
    data/images/<trial>.npy                uint8 (H, W) or (1, H, W): the image shown on that trial
    data/responses/<trial>.npy             float32 (n_units,): one value per unit
    data/behavior/<trial>.npy              (3,): pupil dilation, its derivative, running speed
    data/pupil_center/<trial>.npy          (2,): pupil centre x, y
    meta/trials/frame_image_id.npy         (n_trials,) int: repeated images share an id
    meta/trials/tiers.npy                  optional (n_trials,) str: train / validation / test / oracle
    meta/trials/start_time.npy             optional (n_trials,) float seconds from scan start
    meta/trials/duration.npy               optional (n_trials,) float seconds
    meta/neurons/unit_ids.npy              (n_units,) int, unique
    meta/neurons/cell_motor_coordinates.npy  (n_units, 3) float, cortical position in um
    meta/neurons/area.npy                  optional (n_units,) str

Trials are numbered 0..n_trials-1 and every per-trial folder holds exactly those files. Reading never
touches the database: ``read_scan_folder`` validates *everything* and returns a ``ScanData`` or raises
``ScanFolderError`` naming the file and the fault, so ingestion can insert in one transaction afterwards.
The checks of each file live in ``scan_validation``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .scan_validation import (ScanFolderError, check_trial_files, optional_trial_array, per_trial, read_frame_ids,
                              read_meta, read_units)

__all__ = ["BEHAVIOR_COLUMNS", "TIERS", "ScanData", "ScanFolderError", "assign_tiers", "image_hash",
           "read_scan_folder", "write_scan_folder"]

TIERS = ("train", "validation", "test", "oracle")
BEHAVIOR_COLUMNS = ("pupil_dilation", "pupil_dilation_derivative", "running_speed")
IMAGE_SIDE_MAX = 32767  # Image.height / width are int16
VALIDATION_FRACTION = 0.1  # share of non-repeated images put in the validation tier when tiers.npy is absent


def image_hash(pixels: np.ndarray) -> str:
    """Content address of an image: the same pixels give the same id in every scan and every lab."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256()
    digest.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:32]


@dataclass
class ScanData:
    """A validated scan, ready to insert. Arrays are indexed by trial (rows) and unit (columns)."""

    mouse: str
    session: _dt.date
    scan: int
    area: str
    depth: float
    frame_rate: float
    notes: str
    unit_ids: np.ndarray  # (n_units,) int64
    unit_positions: np.ndarray  # (n_units, 3) float64
    unit_areas: np.ndarray  # (n_units,) str
    images: dict[str, np.ndarray]  # image hash -> uint8 (H, W)
    image_source_ids: dict[str, int]  # image hash -> frame_image_id
    trial_images: list[str]  # (n_trials,) image hash per trial
    tiers: np.ndarray  # (n_trials,) str
    start_time: np.ndarray  # (n_trials,) float64, NaN when unknown
    duration: np.ndarray  # (n_trials,) float64, NaN when unknown
    responses: np.ndarray  # (n_trials, n_units) float32
    behavior: np.ndarray  # (n_trials, 3) float64: BEHAVIOR_COLUMNS
    pupil_center: np.ndarray  # (n_trials, 2) float64
    extra: dict = field(default_factory=dict)

    @property
    def n_trials(self) -> int:
        return self.responses.shape[0]

    @property
    def n_units(self) -> int:
        return self.responses.shape[1]

    @property
    def key(self) -> dict:
        return {"mouse": self.mouse, "session_date": self.session, "scan_idx": self.scan}


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
    if isinstance(meta.get("session"), _dt.date):
        meta["session"] = meta["session"].isoformat()
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
def read_scan_folder(path: Path | str) -> ScanData:
    """Validate a whole scan folder and return it in memory; raise ``ScanFolderError`` on the first fault."""
    root = Path(path)
    if not root.is_dir():
        raise ScanFolderError(root, "not a directory (expected a scan folder with scan.json, data/ and meta/)")
    meta = read_meta(root)
    unit_ids, unit_positions, unit_areas = read_units(root, meta["area"])
    n_units = unit_ids.size
    frame_image_id = read_frame_ids(root)
    n_trials = frame_image_id.size
    check_trial_files(root, n_trials)

    tiers_in = optional_trial_array(root / "meta/trials/tiers.npy", n_trials, "tiers")
    if tiers_in is not None:
        tiers_in = tiers_in.astype(str)
        bad = sorted(set(tiers_in.tolist()) - set(TIERS))
        if bad:
            raise ScanFolderError(root / "meta/trials/tiers.npy", f"unknown tier(s) {bad}; allowed: {list(TIERS)}")
    start_time = optional_trial_array(root / "meta/trials/start_time.npy", n_trials, "trial start times", numeric=True)
    duration = optional_trial_array(root / "meta/trials/duration.npy", n_trials, "trial durations", numeric=True)
    if duration is not None and np.any(duration < 0):
        raise ScanFolderError(root / "meta/trials/duration.npy", "trial durations must not be negative")

    images, source_ids, trial_images = _read_images(root, frame_image_id)
    responses = np.empty((n_trials, n_units), dtype=np.float32)  # float32 by design: 8000 units x 6000 trials
    per_trial(root, "responses", n_trials, (n_units,), f"responses (one value per unit, {n_units} units)", responses)
    behavior = np.empty((n_trials, 3), dtype=np.float64)
    per_trial(root, "behavior", n_trials, (3,), "behavior (pupil dilation, derivative, running speed)", behavior)
    pupil_center = np.empty((n_trials, 2), dtype=np.float64)
    per_trial(root, "pupil_center", n_trials, (2,), "pupil centre (x, y)", pupil_center)

    return ScanData(
        **meta,
        unit_ids=unit_ids,
        unit_positions=unit_positions,
        unit_areas=unit_areas,
        images=images,
        image_source_ids=source_ids,
        trial_images=trial_images,
        tiers=assign_tiers(trial_images, tiers_in),
        start_time=start_time if start_time is not None else np.full(n_trials, np.nan),
        duration=duration if duration is not None else np.full(n_trials, np.nan),
        responses=responses,
        behavior=behavior,
        pupil_center=pupil_center,
    )


def _read_images(root: Path, frame_image_id: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """data/images: one shape and dtype, the same id always the same pixels. Returns the distinct images by
    hash, the lab's frame id of each, and the hash shown on each trial."""
    image_files = per_trial(root, "images", frame_image_id.size, None, "image")
    first = image_files[0]
    if first.dtype != np.uint8:
        raise ScanFolderError(root / "data/images/0.npy", f"images must be uint8 grayscale, got dtype {first.dtype}")
    first = first.reshape(first.shape[1:]) if first.ndim == 3 and first.shape[0] == 1 else first
    if first.ndim != 2:
        raise ScanFolderError(root / "data/images/0.npy", f"images must be (H, W) or (1, H, W), got {image_files[0].shape}")
    if min(first.shape) < 1 or max(first.shape) > IMAGE_SIDE_MAX:
        raise ScanFolderError(root / "data/images/0.npy",
                              f"images must be 1..{IMAGE_SIDE_MAX} pixels on each side, got {first.shape}")
    images: dict[str, np.ndarray] = {}
    source_ids: dict[str, int] = {}
    id_to_hash: dict[int, str] = {}
    trial_images: list[str] = []
    for trial, pixels in enumerate(image_files):
        path = root / "data/images" / f"{trial}.npy"
        if pixels.dtype != np.uint8:
            raise ScanFolderError(path, f"images must all be uint8, this one is {pixels.dtype}")
        if pixels.ndim == 3 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.shape != first.shape:
            raise ScanFolderError(path, f"image shape {pixels.shape} differs from trial 0's {first.shape}")
        digest = image_hash(pixels)
        frame_id = int(frame_image_id[trial])
        if id_to_hash.setdefault(frame_id, digest) != digest:
            raise ScanFolderError(path, f"frame_image_id {frame_id} was shown with different pixels on an earlier trial")
        if digest not in images:
            images[digest] = np.ascontiguousarray(pixels)
            source_ids[digest] = frame_id
        trial_images.append(digest)
    return images, source_ids, trial_images


def assign_tiers(trial_images: list[str], given: np.ndarray | None = None) -> np.ndarray:
    """Repeated images are the oracle set; the rest keep the lab's tiers or get a split fixed by the image.

    The default split is a function of the image hash alone, so an image shown in several scans is in the
    same tier everywhere and no test image leaks into another scan's training set.
    """
    hashes, counts = np.unique(np.asarray(trial_images), return_counts=True)
    repeated = set(hashes[counts > 1].tolist())
    tiers = np.empty(len(trial_images), dtype=object)
    for trial, digest in enumerate(trial_images):
        if digest in repeated:
            tiers[trial] = "oracle"
        elif given is not None:
            tiers[trial] = str(given[trial])
        else:
            in_validation = int(digest[:8], 16) % 1000 < VALIDATION_FRACTION * 1000
            tiers[trial] = "validation" if in_validation else "train"
    return tiers.astype(str)
