"""Scan archives: a published ``.zip`` of a scan folder, extracted to a private scratch folder under the home.

A published zip holds the folder itself (``static...-GrayImageNet-<hash>/data``, ``/meta``), or its
``data/`` and ``meta/`` at the top: both are accepted. Members that would land outside the folder
(absolute paths, '..') or are links are refused before anything is written.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..database.connect import home_folder
from ..errors import ScanFolderError


@contextlib.contextmanager
def unpacked(path: Path):
    """(folder, published name) of a scan folder; a .zip is extracted to a private scratch folder first."""
    if not path.exists():
        raise ScanFolderError(path, "no such file or folder")
    if path.is_dir():
        yield path, path.name
        return
    if not zipfile.is_zipfile(path):
        raise ScanFolderError(path, "neither a scan folder nor a .zip archive of one")
    parent = home_folder() / "tmp"
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = Path(tempfile.mkdtemp(prefix="neureg_ingest_", dir=parent))
    try:
        _extract(path, scratch)
        try:
            yield _scan_root(path, scratch)
        except ScanFolderError as exc:  # name the file inside the zip, not the scratch copy
            inner = exc.path.replace(str(scratch), "").lstrip("/")
            raise ScanFolderError(f"{path}!{inner}" if inner else path, exc.fault) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extract(path: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = PurePosixPath(member.filename)
                is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
                if name.is_absolute() or ".." in name.parts or is_link or "\\" in member.filename:
                    raise ScanFolderError(path, f"unsafe member {member.filename!r} (absolute, '..' or a link)")
            archive.extractall(into)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise ScanFolderError(path, f"damaged zip archive: {exc}") from None


def _scan_root(path: Path, extracted: Path) -> tuple[Path, str]:
    """The scan folder inside an extracted zip, and the name it was published under."""
    if (extracted / "data").is_dir() and (extracted / "meta").is_dir():
        return extracted, path.stem
    folders = [p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(folders) == 1 and (folders[0] / "data").is_dir():
        return folders[0], folders[0].name
    raise ScanFolderError(
        path, "the archive holds no scan folder (expected data/ and meta/, at the top or in one folder)"
    )
