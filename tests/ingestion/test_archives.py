"""Published zips: unambiguous (one scan, one name, one copy of each member), bounded, and every malformed
archive refused with exit 2 and one line naming it, the database unchanged; scratch of a killed ingest removed."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from neureg.errors import ScanFolderError
from neureg.ingestion import ingest_folder
from neureg.ingestion.archives import SCRATCH_PREFIX
from neureg.upkeep.status import table_counts

CASES: list = []


def _animal() -> int:
    return int(uuid.uuid4().int % 10**9)


def _case(name):
    def register(func):
        CASES.append(pytest.param(func, id=name))
        return func

    return register


def _zip_folder(folder: Path, archive: Path, inside: str | None = None, method=zipfile.ZIP_DEFLATED, extra=()):
    """Zip a scan folder under the folder name ``inside`` (default its own); ``extra``: (name, bytes) members."""
    inside = inside or folder.name
    with zipfile.ZipFile(archive, "w", method) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"{inside}/{path.relative_to(folder)}")
        for name, data in extra:
            z.writestr(name, data)
    return archive


def _patch_header(archive: Path, member: str, local: int, central: int, value: int) -> None:
    """Set a 2-byte field of one member in its local header (at ``local``) and central header (at ``central``):
    what other zip tools write and Python's writer will not (encryption flags, other compression methods)."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(member)
    struct.pack_into("<H", data, info.header_offset + local, value)
    central_at = data.find(b"PK\x01\x02")
    while central_at != -1:
        name_len = struct.unpack_from("<H", data, central_at + 28)[0]
        if data[central_at + 46 : central_at + 46 + name_len] == member.encode():
            struct.pack_into("<H", data, central_at + central, value)
            break
        central_at = data.find(b"PK\x01\x02", central_at + 4)
    archive.write_bytes(bytes(data))


def _patch_method(archive: Path, member: str, method: int) -> None:
    _patch_header(archive, member, 8, 10, method)


@_case("name-disagrees-with-the-folder-inside")
def _(folder, tmp):
    _zip_folder(folder, tmp / "static888-2-2-abc.zip", inside="static777-1-1-abc")
    return tmp / "static888-2-2-abc.zip", "mouse disagrees: the folder name 'static777-1-1-abc' says '777'"


@_case("duplicate-member")
def _(folder, tmp):
    with pytest.warns(UserWarning):
        _zip_folder(folder, tmp / "dup.zip", extra=[(f"{folder.name}/data/responses/0.npy", b"second copy")])
    return tmp / "dup.zip", f"member '{folder.name}/data/responses/0.npy' appears twice"


@_case("second-scan-folder-beside-data-and-meta")
def _(folder, tmp):
    archive = tmp / "two.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder)
                z.write(path, str(relative))
                z.write(path, f"static5-5-5-other/{relative}")
    return archive, "holds data/ and meta/ and also the folder(s) ['static5-5-5-other']"


@_case("several-folders")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "several.zip", extra=[("another/data/x.npy", b"x")])
    return archive, "the archive holds several folders"


@_case("name-flagged-utf8-with-invalid-bytes")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "badname.zip", extra=[(f"{folder.name}/\u00e9.txt", b"x")])
    archive.write_bytes(archive.read_bytes().replace("\u00e9.txt".encode(), b"\xff\xfe.txt"))
    return archive, "damaged zip archive"


@_case("corrupt-deflate-stream")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "corrupt.zip", extra=[(f"{folder.name}/notes.txt", b"neureg " * 5000)])
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(f"{folder.name}/notes.txt")
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start : start + 16] = b"\xff" * 16
    archive.write_bytes(bytes(data))
    return archive, "damaged zip archive"


@_case("encrypted-member")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "encrypted.zip", method=zipfile.ZIP_STORED)
    _patch_header(archive, f"{folder.name}/meta/neurons/unit_ids.npy", 6, 8, 0x1)  # general purpose bit 0
    return archive, "is encrypted; publish the scan unencrypted"


@_case("aes-compression-99")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "aes.zip", method=zipfile.ZIP_STORED)
    _patch_method(archive, f"{folder.name}/data/responses/0.npy", 99)
    return archive, "uses compression method 99, which Python cannot read"


@_case("zstd-compression-93")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "zstd.zip", method=zipfile.ZIP_STORED)
    _patch_method(archive, f"{folder.name}/meta/neurons/unit_ids.npy", 93)
    return archive, "uses compression method 93, which Python cannot read"


@_case("member-name-of-300-characters")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "long.zip", extra=[(f"{folder.name}/{'n' * 300}.txt", b"x")])
    return archive, "is longer than 255 bytes a component"


@_case("a-file-and-a-folder-of-one-name")
def _(folder, tmp):
    archive = _zip_folder(folder, tmp / "clash.zip", extra=[(f"{folder.name}/meta/trials/notes", b"x")])
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(f"{folder.name}/meta/trials/notes/x.txt", b"y")
    return archive, f"'{folder.name}/meta/trials/notes' is both a file and a folder in the archive"


@_case("larger-than-the-cap")
def _(folder, tmp):
    os.environ["NEUREG_EXTRACT_MAX_GB"] = "0.001"  # 1 MiB; the test restores it
    archive = _zip_folder(folder, tmp / "big.zip", extra=[(f"{folder.name}/zeros.bin", bytes(4 << 20))])
    return archive, "the limit is 0.00 GiB (NEUREG_EXTRACT_MAX_GB)"


@pytest.mark.parametrize("make", CASES)
def test_bad_archive_is_refused_naming_it(pipeline, tmp_path, scan_folder_factory, make, monkeypatch):
    monkeypatch.setenv("NEUREG_EXTRACT_MAX_GB", "64")  # a case may lower it; monkeypatch restores it
    folder = scan_folder_factory(tmp_path / "src" / f"static{_animal()}-1-1-scan")
    (folder / "scan.json").unlink()  # the identity comes from the names, as in a published archive
    archive, expected = make(folder, tmp_path)
    before = table_counts(pipeline)
    with pytest.raises(ScanFolderError) as info:
        ingest_folder(archive, pipeline)
    assert expected in str(info.value) and str(archive) in str(info.value)
    assert table_counts(pipeline) == before
    assert not list((pipeline.home / "tmp").glob(f"{SCRATCH_PREFIX}*")), "no scratch folder is left"


def test_bad_archives_exit_2_with_one_line_each(pipeline, tmp_path, scan_folder_factory, neureg_cli):
    folder = scan_folder_factory(tmp_path / "src" / f"static{_animal()}-1-1-scan")
    (folder / "scan.json").unlink()
    archives = [make.values[0](folder, tmp_path)[0] for make in CASES if make.id != "larger-than-the-cap"]
    fifo = tmp_path / "pipe.zip"
    os.mkfifo(fifo)
    before = table_counts(pipeline)
    run = neureg_cli("ingest", *map(str, archives), str(fifo), "/dev/zero", timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len([line for line in lines if line.startswith("error: not ingested: ")]) == len(archives) + 2
    assert f"{fifo}: not a regular file" in run.stderr and "/dev/zero: not a regular file" in run.stderr
    assert table_counts(pipeline) == before


def test_the_next_ingest_removes_the_scratch_a_killed_one_left(pipeline, tmp_path, scan_folder_factory, subprocess_env):
    folder = scan_folder_factory(tmp_path / "src" / f"static{_animal()}-1-1-scan")
    big = _zip_folder(folder, tmp_path / "big.zip", extra=[(f"{folder.name}/padding.bin", bytes(600 << 20))])
    scratch_parent = pipeline.home / "tmp"
    proc = subprocess.Popen([sys.executable, "-m", "neureg", "ingest", str(big)], env=subprocess_env)
    deadline = time.monotonic() + 120
    while not list(scratch_parent.glob(f"{SCRATCH_PREFIX}*_{proc.pid}_*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the ingest never started extracting"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(scratch_parent.glob(f"{SCRATCH_PREFIX}*_{proc.pid}_*"))
    assert left, "a killed extraction leaves its scratch folder"
    with pytest.raises(ScanFolderError):
        ingest_folder(tmp_path / "no-such-scan", pipeline)  # any next ingest, even one that fails at once
    assert not any(path.exists() for path in left), "the next ingest removed it"
