"""Stored arrays carry a SHA-256 in the database; a damaged, missing, truncated or reshaped file is refused."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from neureg.database.store import array_digest
from neureg.errors import StoreIntegrityError
from neureg.ingestion import ingest_folder
from neureg.populate.stages import populate_stage


def _independent_digest(array: np.ndarray) -> str:
    """The documented rule written out again: sha256 of '<dtype.str>|<shape>|' then the C-order bytes."""
    c_order = np.array(array, order="C")
    return hashlib.sha256(f"{c_order.dtype.str}|{tuple(c_order.shape)}|".encode() + c_order.tobytes()).hexdigest()


def test_digest_covers_dtype_shape_and_every_byte():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    assert array_digest(a) == _independent_digest(a)
    assert array_digest(np.asfortranarray(a)) == array_digest(a)  # memory layout is not content
    flipped = a.copy()
    flipped.reshape(-1).view(np.uint8)[13] ^= 1
    assert array_digest(flipped) != array_digest(a)
    assert array_digest(a.reshape(5, 7)) != array_digest(a)
    assert array_digest(a.view(np.int32)) != array_digest(a)


@pytest.fixture
def stored_scan(pipeline, tmp_path, scan_folder_factory, unique_mouse):
    """A scan of its own, and the path of its first response block (restored after the test)."""
    key = ingest_folder(scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=5), pipeline)
    blocks = sorted((pipeline.home / "store").rglob(f"mouse={unique_mouse}/**/*.npy"))
    assert blocks, "the scan's blocks are files in the store"
    original = blocks[0].read_bytes()
    yield key, blocks[0]
    blocks[0].write_bytes(original)


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped":
        data = data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:]
        path.write_bytes(data)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "reshaped":  # a valid .npy of the same bytes, but one row short
        array = np.load(io.BytesIO(data))
        buffer = io.BytesIO()
        np.save(buffer, array[:-1])
        path.write_bytes(buffer.getvalue())
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(
    "how, fault",
    [
        ("flipped", "does not match its SHA-256"),
        ("truncated", "unreadable"),
        ("reshaped", "the database recorded"),
        ("missing", "missing"),
    ],
)
def test_damaged_block_is_refused_naming_table_key_and_file(pipeline, stored_scan, how, fault):
    key, path = stored_scan
    _damage(path, how)
    with pytest.raises(StoreIntegrityError) as caught:
        pipeline.experiment.load_responses(key)
    message = str(caught.value)
    assert fault in message and "responses__block" in message and key["mouse"] in message
    assert path.name in message


def test_no_stage_computes_from_a_damaged_block(pipeline, stored_scan):
    key, path = stored_scan
    _damage(path, "flipped")
    summary = populate_stage(pipeline, ["oracle"], keys=[key], suppress_errors=True)
    errors = [e for table in summary.values() for e in table["errors"]]
    assert errors and all("SHA-256" in str(e) for e in errors)
    assert not (pipeline.oracle.OracleStats & key) and not (pipeline.oracle.DataSimilarity & key)


def test_verify_lists_the_damaged_array_and_exits_1(pipeline, stored_scan, neureg_cli):
    key, path = stored_scan

    def verify():
        return neureg_cli("verify", "--json", timeout=600)

    clean = verify()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["checked"] >= 1
    _damage(path, "truncated")
    run = verify()
    assert run.returncode == 1
    damaged = json.loads(run.stdout)["damaged"]
    assert [(d["key"]["mouse"], d["attribute"], d["path"].rsplit("/", 1)[-1]) for d in damaged] == [
        (key["mouse"], "responses", path.name)
    ]
    assert "unreadable" in damaged[0]["fault"]
