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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIERS = ("train", "validation", "test", "oracle")
BEHAVIOR_COLUMNS = ("pupil_dilation", "pupil_dilation_derivative", "running_speed")
REQUIRED_META = ("mouse", "session", "scan")
OPTIONAL_META = {"area": str, "depth": (int, float), "frame_rate": (int, float), "notes": str}
_MOUSE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # used with fullmatch: no trailing newline
_TRIAL_FILE = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes '²'
FLOAT32_MAX = float(np.finfo(np.float32).max)
NOTES_MAX = 4096  # Scan.scan_notes is varchar(4096)
IMAGE_SIDE_MAX = 32767  # Image.height / width are int16
VALIDATION_FRACTION = 0.1  # share of non-repeated images put in the validation tier when tiers.npy is absent


class ScanFolderError(ValueError):
    """A scan folder that cannot be ingested; the message names the file and the fault."""

    def __init__(self, path: Path | str, fault: str):
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{path}: {fault}")


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
def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ScanFolderError(path, f"missing ({what})")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds for truncated or foreign files
        raise ScanFolderError(path, f"not a readable .npy file ({what}): {exc}") from None


def _read_meta(root: Path) -> dict:
    path = root / "scan.json"
    if not path.is_file():
        raise ScanFolderError(path, "missing: every scan folder needs a scan.json naming mouse, session and scan")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScanFolderError(path, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ScanFolderError(path, "not valid JSON: nested too deeply") from None
    except _DuplicateKey as exc:
        raise ScanFolderError(path, f"key {exc.args[0]!r} appears twice (which one is meant?)") from None
    if not isinstance(meta, dict):
        raise ScanFolderError(path, "must hold a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ScanFolderError(path, f"missing required key(s) {missing}; required: {list(REQUIRED_META)}")
    unknown = sorted(set(meta) - set(REQUIRED_META) - set(OPTIONAL_META))
    if unknown:
        allowed = list(REQUIRED_META) + list(OPTIONAL_META)
        raise ScanFolderError(path, f"unknown key(s) {unknown} (a typo?); allowed: {allowed}")
    for key, value in meta.items():
        if isinstance(value, str):
            _check_text(path, key, value)
    mouse = meta["mouse"]
    if not isinstance(mouse, str) or not _MOUSE_PATTERN.fullmatch(mouse):
        raise ScanFolderError(path, f"'mouse' must be 1-32 letters, digits, '_', '-' or '.', got {mouse!r}")
    try:
        session = _dt.date.fromisoformat(meta["session"]) if isinstance(meta["session"], str) else None
    except ValueError:
        session = None
    if session is None:
        raise ScanFolderError(path, f"'session' must be the recording date as YYYY-MM-DD, got {meta['session']!r}")
    scan = meta["scan"]
    if isinstance(scan, bool) or not isinstance(scan, int) or not 0 <= scan < 32768:
        raise ScanFolderError(path, f"'scan' must be an integer index 0..32767, got {scan!r}")
    for key, kind in OPTIONAL_META.items():
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ScanFolderError(path, f"'{key}' has the wrong type: {value!r}")
    for key in ("depth", "frame_rate"):
        value = meta.get(key)
        if value is None:
            continue
        try:
            number = float(value)  # a 400-digit integer overflows here, not later
        except OverflowError:
            number = float("inf")
        if not (np.isfinite(number) and number >= 0 and (key == "depth" or number > 0) and number <= FLOAT32_MAX):
            kind = "non-negative" if key == "depth" else "positive"
            raise ScanFolderError(path, f"'{key}' must be a finite {kind} number within float32 range, got {str(value)[:40]}")
    if len(meta.get("area") or "") > 32:
        raise ScanFolderError(path, "'area' must be at most 32 characters")
    if len(meta.get("notes") or "") > NOTES_MAX:
        raise ScanFolderError(path, f"'notes' must be at most {NOTES_MAX} characters, got {len(meta['notes'])}")
    return {
        "mouse": mouse,
        "session": session,
        "scan": scan,
        "area": meta.get("area") or "",
        "depth": float(meta["depth"]) if meta.get("depth") is not None else float("nan"),
        "frame_rate": float(meta["frame_rate"]) if meta.get("frame_rate") is not None else float("nan"),
        "notes": meta.get("notes") or "",
    }


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple]) -> dict:
    """json.loads keeps the last of two equal keys; a scan's metadata must not be ambiguous."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_text(path: Path, what: str, value: str) -> None:
    """Text the databases can store: valid UTF-8 (no lone surrogates) and no NUL character."""
    if "\x00" in value:
        raise ScanFolderError(path, f"{what!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ScanFolderError(path, f"{what!r} is not valid Unicode text (a lone surrogate?)") from None


def _trial_numbers(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise ScanFolderError(folder, "missing folder")
    numbers = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        stem, dot, suffix = entry.name.partition(".")
        if suffix != "npy" or not _TRIAL_FILE.fullmatch(stem):
            raise ScanFolderError(entry, "unexpected file: per-trial files are named <trial>.npy, e.g. 0.npy")
        numbers.append(int(stem))
    return sorted(numbers)


def _per_trial(root: Path, sub: str, n_trials: int, shape: tuple | None, what: str, out: np.ndarray | None = None):
    """Load data/<sub>/<t>.npy for every trial into ``out`` (preallocated) checking shape and finiteness."""
    folder = root / "data" / sub
    arrays = []
    for trial in range(n_trials):
        path = folder / f"{trial}.npy"
        value = _load(path, what)
        if shape is not None and value.shape != shape:
            raise ScanFolderError(path, f"{what} has shape {value.shape}, expected {shape}")
        if out is not None:
            if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
                raise ScanFolderError(path, f"{what} must be real numbers, got dtype {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ScanFolderError(path, f"{what} contains NaN or infinite values")
            # Finite in the file's dtype is not finite in the stored one: 1e39 as float64 becomes inf
            # as float32. Check again after the cast.
            with np.errstate(over="ignore", invalid="ignore"):
                stored = value.astype(out.dtype)
            if not np.all(np.isfinite(stored)):
                limit = np.finfo(out.dtype).max
                raise ScanFolderError(path, f"{what} has values beyond the stored {out.dtype} range (|x| > {limit:.3g})")
            out[trial] = stored
        else:
            arrays.append(value)
    return arrays


def read_scan_folder(path: Path | str) -> ScanData:
    """Validate a whole scan folder and return it in memory; raise ``ScanFolderError`` on the first fault."""
    root = Path(path)
    if not root.is_dir():
        raise ScanFolderError(root, "not a directory (expected a scan folder with scan.json, data/ and meta/)")
    meta = _read_meta(root)

    unit_ids = _load(root / "meta/neurons/unit_ids.npy", "unit ids")
    ids_path = root / "meta/neurons/unit_ids.npy"
    if unit_ids.ndim != 1 or unit_ids.size == 0:
        raise ScanFolderError(ids_path, f"must be a non-empty 1-d array, got shape {unit_ids.shape}")
    if not np.issubdtype(unit_ids.dtype, np.integer):
        raise ScanFolderError(ids_path, f"unit ids must be integers, got dtype {unit_ids.dtype}")
    if np.any(unit_ids < 0) or np.any(unit_ids > np.iinfo(np.int32).max):
        raise ScanFolderError(ids_path, "unit ids must lie in 0..2147483647")
    unique, counts = np.unique(unit_ids, return_counts=True)
    if np.any(counts > 1):
        raise ScanFolderError(ids_path, f"unit ids are not unique: {unique[counts > 1][:5].tolist()} repeat")
    n_units = unit_ids.size

    coord_path = root / "meta/neurons/cell_motor_coordinates.npy"
    coords = _load(coord_path, "cortical positions")
    if coords.shape != (n_units, 3) or not _real(coords):
        raise ScanFolderError(coord_path, f"must be numeric ({n_units}, 3) for {n_units} units, got {coords.shape} {coords.dtype}")
    if not np.all(np.isfinite(coords)):
        raise ScanFolderError(coord_path, "contains NaN or infinite values")
    area_path = root / "meta/neurons/area.npy"
    areas = _load(area_path, "unit areas").astype(str) if area_path.exists() else np.full(n_units, meta["area"], dtype=object)
    if areas.shape != (n_units,):
        raise ScanFolderError(area_path, f"must have one area per unit ({n_units}), got shape {areas.shape}")
    if any(len(a) > 32 for a in areas):
        raise ScanFolderError(area_path, "area names must be at most 32 characters")
    for area in set(areas.tolist()):
        _check_text(area_path, "unit area", str(area))

    frame_path = root / "meta/trials/frame_image_id.npy"
    frame_image_id = _load(frame_path, "image id per trial")
    if frame_image_id.ndim != 1 or not np.issubdtype(frame_image_id.dtype, np.integer):
        raise ScanFolderError(frame_path, f"must be a 1-d integer array, got {frame_image_id.shape} {frame_image_id.dtype}")
    int64 = np.iinfo(np.int64)
    if frame_image_id.size and (int(frame_image_id.max()) > int64.max or int(frame_image_id.min()) < int64.min):
        raise ScanFolderError(frame_path, "image ids must fit a signed 64-bit integer (|id| < 2^63)")
    frame_image_id = frame_image_id.astype(np.int64)
    n_trials = frame_image_id.size
    if n_trials == 0:
        raise ScanFolderError(frame_path, "the scan has no trials")
    for sub in ("images", "responses", "behavior", "pupil_center"):
        numbers = _trial_numbers(root / "data" / sub)
        if numbers != list(range(n_trials)):
            have = set(numbers)
            missing = [t for t in range(n_trials) if t not in have][:5]
            extra = [t for t in numbers if t >= n_trials][:5]
            detail = f"missing trials {missing}" if missing else f"extra trials {extra}"
            raise ScanFolderError(
                root / "data" / sub,
                f"holds {len(numbers)} trial files but meta/trials/frame_image_id.npy lists {n_trials} trials ({detail})",
            )

    tiers_in = _optional_trial_array(root / "meta/trials/tiers.npy", n_trials, "tiers")
    if tiers_in is not None:
        tiers_in = tiers_in.astype(str)
        bad = sorted(set(tiers_in.tolist()) - set(TIERS))
        if bad:
            raise ScanFolderError(root / "meta/trials/tiers.npy", f"unknown tier(s) {bad}; allowed: {list(TIERS)}")
    start_time = _optional_trial_array(root / "meta/trials/start_time.npy", n_trials, "trial start times", numeric=True)
    duration = _optional_trial_array(root / "meta/trials/duration.npy", n_trials, "trial durations", numeric=True)
    if duration is not None and np.any(duration < 0):
        raise ScanFolderError(root / "meta/trials/duration.npy", "trial durations must not be negative")

    # Images: one shape and dtype, the same id always the same pixels.
    image_files = _per_trial(root, "images", n_trials, None, "image")
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

    responses = np.empty((n_trials, n_units), dtype=np.float32)  # float32 by design: 8000 units x 6000 trials
    _per_trial(root, "responses", n_trials, (n_units,), f"responses (one value per unit, {n_units} units)", responses)
    behavior = np.empty((n_trials, 3), dtype=np.float64)
    _per_trial(root, "behavior", n_trials, (3,), "behavior (pupil dilation, derivative, running speed)", behavior)
    pupil_center = np.empty((n_trials, 2), dtype=np.float64)
    _per_trial(root, "pupil_center", n_trials, (2,), "pupil centre (x, y)", pupil_center)

    return ScanData(
        mouse=meta["mouse"],
        session=meta["session"],
        scan=meta["scan"],
        area=meta["area"],
        depth=meta["depth"],
        frame_rate=meta["frame_rate"],
        notes=meta["notes"],
        unit_ids=unit_ids.astype(np.int64),
        unit_positions=coords.astype(np.float64),
        unit_areas=np.asarray(areas, dtype=str),
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


def _optional_trial_array(path: Path, n_trials: int, what: str, numeric: bool = False) -> np.ndarray | None:
    if not path.exists():
        return None
    values = _load(path, what)
    if values.shape != (n_trials,):
        raise ScanFolderError(path, f"{what} must have one entry per trial ({n_trials}), got shape {values.shape}")
    if numeric:
        if not _real(values):
            raise ScanFolderError(path, f"{what} must be real numbers, got dtype {values.dtype}")
        if not np.all(np.isfinite(values)):
            raise ScanFolderError(path, f"{what} contain NaN or infinite values")
        return values.astype(np.float64)
    return values


def _real(values: np.ndarray) -> bool:
    """Real numbers: complex ones would lose their imaginary part silently when stored."""
    return np.issubdtype(values.dtype, np.number) and not np.issubdtype(values.dtype, np.complexfloating)


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
