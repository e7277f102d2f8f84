"""Which scan a folder holds: mouse, session number and scan index, from every source that names them.

A published mouse-V1 folder (Sensorium 2022, Lurz et al. 2021) has no scan.json: its identity is in
``meta/trials/{animal_id,session,scan_idx}.npy`` (one entry per trial), in
``meta/neurons/{animal_ids,sessions,scan_idx}.npy`` (one per unit) and in its name,
``static{animal}-{session}-{scan}-GrayImageNet-{hash}`` (older: ``...-preproc0``). A lab's own folder may
carry a scan.json instead, or as well. Every source present must agree; a disagreement is refused with
both sources named, since ingesting a scan under the wrong key would silently mix two animals.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ScanFolderError
from .validation import MOUSE_PATTERN, SESSION_LIMIT, SMALLINT_LIMIT, load_array

#: static<animal>-<session>-<scan>-<anything>, e.g. static26872-17-20-GrayImageNet-94c6ff99...
FOLDER_NAME = re.compile(r"static(\d+)-(\d+)-(\d+)(?:-.*)?")
META_FILES = {
    "meta/trials": ("animal_id.npy", "session.npy", "scan_idx.npy"),
    "meta/neurons": ("animal_ids.npy", "sessions.npy", "scan_idx.npy"),
}


def _constant(path: Path, what: str) -> str | None:
    """The one value every entry of an identity file holds (as text), None when the file is absent."""
    if not path.exists():
        return None
    values = np.atleast_1d(load_array(path, what))
    if values.size == 0:
        raise ScanFolderError(path, f"{what} is empty")
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise ScanFolderError(path, f"{what} holds NaN or infinity, not a mouse, session or scan number")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype.kind in "USb"):
        raise ScanFolderError(path, f"{what} must hold numbers or text, got dtype {values.dtype}")
    distinct = np.unique(values.astype(str))
    if distinct.size != 1:
        raise ScanFolderError(path, f"{what} names several values {distinct[:4].tolist()}: one folder is one scan")
    text = str(distinct[0]).strip()
    if np.issubdtype(values.dtype, np.floating) and float(text) == int(float(text)):
        text = str(int(float(text)))  # 26872.0 -> 26872
    return text


def _sources(root: Path, names: list[tuple[str, str]], meta: dict) -> list[tuple[str, tuple]]:
    """(source, (mouse, session, scan)) for every source present; an entry of None means 'not given'."""
    found = []
    if any(k in meta for k in ("mouse", "session", "scan")):
        found.append(("scan.json", (meta.get("mouse"), meta.get("session"), meta.get("scan"))))
    for what, name in names:
        match = FOLDER_NAME.fullmatch(name)
        if match:
            found.append((f"{what} {name!r}", (match[1], match[2], match[3])))
    for folder, files in META_FILES.items():
        values = tuple(_constant(root / folder / f, f"{folder}/{f}") for f in files)
        if any(v is not None for v in values):
            found.append((f"{folder}/{{{','.join(files)}}}", values))
    return found


def _as_int(value, source: str, what: str, limit: int) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) >= limit:
        raise ScanFolderError(source, f"{what} must be an integer 0..{limit - 1}, got {value!r}")
    return int(text)


def resolve_identity(root: Path, names: list[tuple[str, str]], meta: dict) -> tuple[str, int, int]:
    """(mouse, session, scan) of the folder ``root``; ScanFolderError if the sources disagree or none names
    the scan. ``names`` are (what, name) pairs it was published under: its folder's name, an archive's."""
    sources = _sources(root, names, meta)
    chosen: dict[str, tuple[object, str]] = {}
    for source, values in sources:
        for field, value in zip(("mouse", "session", "scan"), values):
            if value is None:
                continue
            value = (
                str(value)
                if field == "mouse"
                else _as_int(value, source, field, SESSION_LIMIT if field == "session" else SMALLINT_LIMIT)
            )
            if field in chosen and chosen[field][0] != value:
                earlier_value, earlier_source = chosen[field]
                raise ScanFolderError(
                    root, f"{field} disagrees: {earlier_source} says {earlier_value!r}, {source} says {value!r}"
                )
            chosen.setdefault(field, (value, source))
    missing = [f for f in ("mouse", "session", "scan") if f not in chosen]
    if missing:
        raise ScanFolderError(
            root,
            f"no {', '.join(missing)} for this scan: give them in scan.json, in "
            "meta/trials/{animal_id,session,scan_idx}.npy, or name the folder "
            "static<mouse>-<session>-<scan>-...",
        )
    mouse = chosen["mouse"][0]
    if not MOUSE_PATTERN.fullmatch(mouse):
        raise ScanFolderError(
            root, f"mouse {mouse!r} ({chosen['mouse'][1]}) must be 1-32 letters, digits, '_', '-' or '.'"
        )
    return mouse, chosen["session"][0], chosen["scan"][0]
