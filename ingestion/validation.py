"""The checks behind ``read_scan_folder``: every file of a scan folder present, typed, shaped and in range.

Each check raises ``ScanFolderError`` naming the file and the fault, so a lab member can fix the folder
without reading code. ``folder`` assembles the checked pieces into a ``ScanData``; the checks live
here so that the format (``folder``) reads in one sitting.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import stat
from pathlib import Path

import numpy as np

from ..errors import ScanFolderError

IDENTITY_META = ("mouse", "session", "scan")  # optional where the meta files or the folder name give them
OPTIONAL_META = {"date": str, "area": str, "depth": (int, float), "frame_rate": (int, float), "notes": str}
MOUSE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # used with fullmatch: no trailing newline
_TRIAL_FILE = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes '²'
FLOAT32_MAX = float(np.finfo(np.float32).max)
NOTES_MAX = 4096  # Scan.scan_notes is varchar(4096)
SESSION_LIMIT = 2**31  # Session.session is int32: numbers 0 .. SESSION_LIMIT - 1
SMALLINT_LIMIT = 2**15  # Scan.scan_idx, Image.height and width are int16: 0 .. SMALLINT_LIMIT - 1
AREA_MAX = 32  # Scan.area and Scan.Unit.area are varchar(32)
META_BYTES_MAX = 1 << 20  # scan.json: a few keys and at most 4096 characters of notes


def check_regular(path: Path, what: str) -> None:
    """``path`` is a regular file (or a link to one): a device, FIFO or socket would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ScanFolderError(path, f"missing ({what})") from None
    except OSError as exc:
        raise ScanFolderError(path, f"cannot be read ({what}): {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise ScanFolderError(path, f"not a regular file ({what}): a device, FIFO, socket or folder is refused")


def load_array(path: Path, what: str) -> np.ndarray:
    """One .npy file, or a ``ScanFolderError`` saying it is missing or unreadable (never a numpy traceback)."""
    check_regular(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds for truncated or foreign files
        raise ScanFolderError(path, f"not a readable .npy file ({what}): {exc}") from None


def is_real(values: np.ndarray) -> bool:
    """Real numbers: complex ones would lose their imaginary part silently when stored."""
    return np.issubdtype(values.dtype, np.number) and not np.issubdtype(values.dtype, np.complexfloating)


def check_text(path: Path, what: str, value: str) -> None:
    """Text the databases can store: valid UTF-8 (no lone surrogates) and no NUL character."""
    if "\x00" in value:
        raise ScanFolderError(path, f"{what!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ScanFolderError(path, f"{what!r} is not valid Unicode text (a lone surrogate?)") from None


def as_text(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """An array as text (numpy str); bytes that are not ASCII are a fault naming the file, not a traceback."""
    try:
        return values.astype(str)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScanFolderError(path, f"{what} are not readable as text: {exc}") from None


def check_memory(root: Path, n_trials: int, n_units: int) -> None:
    """Refuse, before reading any response, a scan whose matrix would not fit this machine's free memory.

    Ingestion holds the (n_trials, n_units) float32 matrix once, plus one block being written; the budget is
    the memory available now (``/proc/meminfo``), or ``NEUREG_INGEST_MEMORY_GB`` where a lab sets a cap.
    """
    need = n_trials * n_units * 4 * 1.1 + 64 * 2**20
    available = available_memory()
    cap = os.environ.get("NEUREG_INGEST_MEMORY_GB")
    if cap:
        try:
            available = min(available, float(cap) * 2**30)
        except ValueError:
            raise ScanFolderError(root, f"NEUREG_INGEST_MEMORY_GB must be a number of GiB, got {cap!r}") from None
    if need > available:
        raise ScanFolderError(
            root,
            f"the scan is {n_units} units x {n_trials} trials: ingesting it needs about {need / 2**30:.1f} GiB "
            f"of memory and {available / 2**30:.1f} GiB is available here; ingest it on a larger machine",
        )


def available_memory() -> float:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere: physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ------------------------------------------------------------------------------------------ scan.json
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


def _parse_meta(path: Path) -> dict:
    """scan.json as a dict with only known keys, or the fault that stops it being one."""
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
    unknown = sorted(set(meta) - set(IDENTITY_META) - set(OPTIONAL_META))
    if unknown:
        allowed = list(IDENTITY_META) + list(OPTIONAL_META)
        raise ScanFolderError(path, f"unknown key(s) {unknown} (a typo?); allowed: {allowed}")
    for key, value in meta.items():
        if isinstance(value, str):
            check_text(path, key, value)
    return meta


def _check_numbers(path: Path, meta: dict) -> None:
    """depth and frame_rate: finite, of the right sign and storable as float32 (Scan's columns)."""
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
            raise ScanFolderError(
                path, f"'{key}' must be a finite {kind} number within float32 range, got {str(value)[:40]}"
            )


def read_meta(root: Path) -> dict:
    """scan.json, if there is one, checked key by key: identity (mouse, session, scan) where given, and the
    facts the data files lack (date, area, depth, frame rate, notes). Absent keys are absent or empty."""
    path = root / "scan.json"
    if not path.exists() and not path.is_symlink():
        return {"area": "", "depth": float("nan"), "frame_rate": float("nan"), "notes": "", "date": None}
    check_regular(path, "scan metadata")
    if path.stat().st_size > META_BYTES_MAX:
        raise ScanFolderError(path, f"is {path.stat().st_size} bytes; scan metadata is at most {META_BYTES_MAX}")
    meta = _parse_meta(path)
    mouse = meta.get("mouse")
    if mouse is not None and (not isinstance(mouse, str) or not MOUSE_PATTERN.fullmatch(mouse)):
        raise ScanFolderError(path, f"'mouse' must be 1-32 letters, digits, '_', '-' or '.', got {mouse!r}")
    session = meta.get("session")
    if session is not None and (
        isinstance(session, bool) or not isinstance(session, int) or not 0 <= session < SESSION_LIMIT
    ):
        hint = "; put the recording date in 'date' (YYYY-MM-DD)" if isinstance(session, str) else ""
        raise ScanFolderError(
            path, f"'session' must be the session number, an integer 0..{SESSION_LIMIT - 1}, got {session!r}{hint}"
        )
    scan = meta.get("scan")
    if scan is not None and (isinstance(scan, bool) or not isinstance(scan, int) or not 0 <= scan < SMALLINT_LIMIT):
        raise ScanFolderError(path, f"'scan' must be an integer index 0..{SMALLINT_LIMIT - 1}, got {scan!r}")
    for key, kind in OPTIONAL_META.items():
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ScanFolderError(path, f"'{key}' has the wrong type: {value!r}")
    date = None
    if meta.get("date") is not None:
        try:
            date = _dt.date.fromisoformat(meta["date"]) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["date"]) else None
        except ValueError:
            date = None
        if date is None:
            raise ScanFolderError(
                path, f"'date' must be the recording date as YYYY-MM-DD (ISO 8601), got {meta['date']!r}"
            )
    _check_numbers(path, meta)
    if len(meta.get("area") or "") > AREA_MAX:
        raise ScanFolderError(path, f"'area' must be at most {AREA_MAX} characters")
    if len(meta.get("notes") or "") > NOTES_MAX:
        raise ScanFolderError(path, f"'notes' must be at most {NOTES_MAX} characters, got {len(meta['notes'])}")
    number = lambda key: float(meta[key]) if meta.get(key) is not None else float("nan")  # noqa: E731
    identity = {k: meta[k] for k in IDENTITY_META if meta.get(k) is not None}
    return {
        **identity,
        "date": date,
        "area": meta.get("area") or "",
        "depth": number("depth"),
        "frame_rate": number("frame_rate"),
        "notes": meta.get("notes") or "",
    }


# ------------------------------------------------------------------------------------------ meta/neurons
def read_units(root: Path, default_area: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """meta/neurons: unique unit ids in int32 range, one finite cortical position and one area per unit."""
    ids_path = root / "meta/neurons/unit_ids.npy"
    unit_ids = load_array(ids_path, "unit ids")
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
    coords = load_array(coord_path, "cortical positions")
    if coords.shape != (n_units, 3) or not is_real(coords):
        raise ScanFolderError(
            coord_path, f"must be numeric ({n_units}, 3) for {n_units} units, got {coords.shape} {coords.dtype}"
        )
    if not np.all(np.isfinite(coords)):
        raise ScanFolderError(coord_path, "contains NaN or infinite values")
    area_path = root / "meta/neurons/area.npy"
    areas = (
        as_text(load_array(area_path, "unit areas"), area_path, "unit areas")
        if area_path.exists()
        else np.full(n_units, default_area, dtype=object)
    )
    if areas.shape != (n_units,):
        raise ScanFolderError(area_path, f"must have one area per unit ({n_units}), got shape {areas.shape}")
    if any(len(a) > AREA_MAX for a in areas):
        raise ScanFolderError(area_path, f"area names must be at most {AREA_MAX} characters")
    for area in set(areas.tolist()):
        check_text(area_path, "unit area", str(area))
    return unit_ids.astype(np.int64), coords.astype(np.float64), np.asarray(areas, dtype=str)


# ------------------------------------------------------------------------------------------ trials
def read_frame_ids(root: Path) -> np.ndarray:
    """meta/trials/frame_image_id.npy as int64: it fixes the number of trials every other file must match."""
    frame_path = root / "meta/trials/frame_image_id.npy"
    frame_image_id = load_array(frame_path, "image id per trial")
    if frame_image_id.ndim != 1 or not np.issubdtype(frame_image_id.dtype, np.integer):
        raise ScanFolderError(
            frame_path, f"must be a 1-d integer array, got {frame_image_id.shape} {frame_image_id.dtype}"
        )
    int64 = np.iinfo(np.int64)
    if frame_image_id.size and (int(frame_image_id.max()) > int64.max or int(frame_image_id.min()) < int64.min):
        raise ScanFolderError(frame_path, "image ids must fit a signed 64-bit integer (|id| < 2^63)")
    if frame_image_id.size == 0:
        raise ScanFolderError(frame_path, "the scan has no trials")
    return frame_image_id.astype(np.int64)


def _trial_numbers(folder: Path) -> list[int]:
    """The trial numbers of a per-trial folder's <trial>.npy files; any other file is a fault."""
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


def check_trial_files(root: Path, n_trials: int) -> None:
    """Every data/<kind>/ folder holds exactly the files 0.npy .. <n_trials - 1>.npy."""
    for sub in ("images", "responses", "behavior", "pupil_center"):
        numbers = _trial_numbers(root / "data" / sub)
        if numbers != list(range(n_trials)):
            have = set(numbers)
            missing = [t for t in range(n_trials) if t not in have][:5]
            extra = [t for t in numbers if t >= n_trials][:5]
            detail = f"missing trials {missing}" if missing else f"extra trials {extra}"
            raise ScanFolderError(
                root / "data" / sub,
                f"holds {len(numbers)} trial files but meta/trials/frame_image_id.npy lists {n_trials} trials "
                f"({detail})",
            )


def per_trial(root: Path, sub: str, n_trials: int, shape: tuple, what: str, out: np.ndarray) -> None:
    """Load data/<sub>/<t>.npy for every trial into ``out`` (preallocated) checking shape and finiteness."""
    folder = root / "data" / sub
    for trial in range(n_trials):
        path = folder / f"{trial}.npy"
        value = load_array(path, what)
        if value.shape != shape:
            raise ScanFolderError(path, f"{what} has shape {value.shape}, expected {shape}")
        if not is_real(value):
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


def optional_trial_array(path: Path, n_trials: int, what: str, numeric: bool = False) -> np.ndarray | None:
    """An optional meta/trials file: None when absent, else one entry per trial (finite reals if ``numeric``)."""
    if not path.exists():
        return None
    values = load_array(path, what)
    if values.shape != (n_trials,):
        raise ScanFolderError(path, f"{what} must have one entry per trial ({n_trials}), got shape {values.shape}")
    if numeric:
        if not is_real(values):
            raise ScanFolderError(path, f"{what} must be real numbers, got dtype {values.dtype}")
        if not np.all(np.isfinite(values)):
            raise ScanFolderError(path, f"{what} contain NaN or infinite values")
        return values.astype(np.float64)
    return values
