"""Scan archives: a published ``.zip`` of a scan folder, checked whole, then extracted to a private scratch folder.

A published zip holds the folder itself (``static...-GrayImageNet-<hash>/data``, ``/meta``), or its
``data/`` and ``meta/`` at the top: both are accepted, and nothing else beside them. Every member is
judged before a byte is written: no absolute paths, '..', links, duplicate names, a file and a folder of
one name, over-long names, encryption or compression methods Python cannot read. The declared sizes
bound what extraction may write (zipfile never reads past a member's declared size), and must fit under
both the free space of the scratch folder and ``NEUREG_EXTRACT_MAX_GB`` (default 64). A scratch folder is
named after its host and process, so the next ingest (of anything) removes those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..database.connect import home_folder
from ..errors import ScanFolderError
from .validation import check_regular

EXTRACT_MAX_GB = 64.0  # default cap on what one archive may write (a Sensorium scan is about 1.5 GB)
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
NAME_MAX = 255  # bytes per path component on common file systems
SCRATCH_PREFIX = "neureg_ingest_"
CHUNK = 1 << 20


@contextlib.contextmanager
def unpacked(path: Path):
    """(folder, [(source, name), ...]) of a scan folder; a .zip is checked and extracted first.

    The names are what the identity may be read from: the folder's name, and for an archive also the
    archive's own name, so that a zip named for one scan that holds another is refused (``identity``).
    """
    parent = home_folder() / "tmp"
    if parent.is_dir():
        remove_abandoned_scratch(parent)  # every ingest, of a folder or a zip, tidies after killed ones
    if not path.exists():
        raise ScanFolderError(path, "no such file or folder")
    if path.is_dir():
        yield path, [("the folder name", path.name)]
        return
    check_regular(path, "a scan folder or a .zip archive of one")
    if not zipfile.is_zipfile(path):
        raise ScanFolderError(path, "neither a scan folder nor a .zip archive of one")
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host()}_{os.getpid()}_", dir=parent))
    try:
        _extract(path, scratch)
        try:
            yield _scan_root(path, scratch)
        except ScanFolderError as exc:  # name the file inside the zip, not the scratch copy
            inner = exc.path.replace(str(scratch), "").lstrip("/")
            raise ScanFolderError(f"{path}!{inner}" if inner else path, exc.fault) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in platform.node())[:64] or "host"


def remove_abandoned_scratch(parent: Path) -> list[Path]:
    """Remove scratch folders of this host whose process is gone (killed during extraction); return them.

    Folders of other hosts (a shared home) are left to their own host: a pid means nothing elsewhere.
    """
    removed = []
    for folder in parent.glob(f"{SCRATCH_PREFIX}{_host()}_*"):
        pid_text = folder.name[len(f"{SCRATCH_PREFIX}{_host()}_") :].split("_", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _extract_cap() -> float:
    text = os.environ.get("NEUREG_EXTRACT_MAX_GB")
    if not text:
        return EXTRACT_MAX_GB * 2**30
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ScanFolderError("NEUREG_EXTRACT_MAX_GB", f"must be a positive number of GiB, got {text!r}")
    return value * 2**30


def _check_members(path: Path, members: list[zipfile.ZipInfo], into: Path) -> None:
    """Every reason to refuse the archive, judged from its directory before anything is written."""
    seen: dict[str, str] = {}
    files, folders = set(), set()
    for member in members:
        raw = member.filename
        name = PurePosixPath(raw)
        is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
        if name.is_absolute() or ".." in name.parts or is_link or "\\" in raw or "\x00" in raw:
            raise ScanFolderError(path, f"unsafe member {raw!r} (absolute, '..' or a link)")
        try:
            too_long = any(len(part.encode("utf-8")) > NAME_MAX for part in name.parts) or len(raw) > 4096
        except UnicodeEncodeError:
            raise ScanFolderError(path, f"member name {raw!r} is not valid text") from None
        if too_long:
            raise ScanFolderError(path, f"member name {raw[:60]!r}... is longer than {NAME_MAX} bytes a component")
        normal = "/".join(name.parts)
        if normal in seen:
            raise ScanFolderError(path, f"member {normal!r} appears twice (which copy is meant?)")
        seen[normal] = raw
        (folders if member.is_dir() else files).add(normal)
        folders.update("/".join(name.parts[:i]) for i in range(1, len(name.parts)))
        if member.flag_bits & 0x1:
            raise ScanFolderError(path, f"member {raw!r} is encrypted; publish the scan unencrypted")
        if member.compress_type not in READABLE_METHODS:
            raise ScanFolderError(
                path, f"member {raw!r} uses compression method {member.compress_type}, which Python cannot read"
            )
    both = sorted(files & folders)
    if both:
        raise ScanFolderError(path, f"{both[0]!r} is both a file and a folder in the archive")
    declared = sum(m.file_size for m in members)
    cap, free = _extract_cap(), shutil.disk_usage(into).free
    if declared > min(cap, free):
        raise ScanFolderError(
            path,
            f"extracting it would write {declared / 2**30:.2f} GiB; the limit is {cap / 2**30:.2f} GiB "
            f"(NEUREG_EXTRACT_MAX_GB) and {free / 2**30:.2f} GiB is free in {into.parent}",
        )


def _extract(path: Path, into: Path) -> None:
    """Check every member, then write them one by one (streamed, each bounded by its declared size)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_members(path, members, into)
            for member in members:
                target = into.joinpath(*PurePosixPath(member.filename).parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "xb") as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
    except ScanFolderError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ScanFolderError(path, f"damaged zip archive: {exc}") from None
    except NotImplementedError as exc:  # a method the checks above did not know
        raise ScanFolderError(path, f"unreadable zip archive: {exc}") from None
    except RuntimeError as exc:  # zipfile's "encrypted, password required"
        raise ScanFolderError(path, f"unreadable zip archive: {exc}") from None
    except OSError as exc:
        if exc.errno is not None and exc.errno in (28, 122):  # ENOSPC, EDQUOT: the disk, not the archive
            raise
        raise ScanFolderError(path, f"cannot extract the archive: {exc.strerror or exc}") from None


def _scan_root(path: Path, extracted: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The scan folder inside an extracted zip, and the names its identity may come from."""
    entries = [p for p in extracted.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    folders = [p for p in entries if p.is_dir()]
    archive_name = [("the archive name", path.stem)]
    if (extracted / "data").is_dir() and (extracted / "meta").is_dir():
        others = sorted(p.name for p in folders if p.name not in ("data", "meta"))
        if others:
            raise ScanFolderError(
                path, f"the archive holds data/ and meta/ and also the folder(s) {others}: one archive is one scan"
            )
        return extracted, archive_name
    if len(folders) == 1 and (folders[0] / "data").is_dir():
        return folders[0], [("the folder name", folders[0].name), *archive_name]
    if len(folders) > 1:
        raise ScanFolderError(
            path, f"the archive holds several folders {sorted(p.name for p in folders)[:4]}: one archive is one scan"
        )
    raise ScanFolderError(
        path, "the archive holds no scan folder (expected data/ and meta/, at the top or in one folder)"
    )
