"""``<blob>`` values whose expansion is bounded on read (database/blobs.py), on both backends.

A compressed blob records its uncompressed size; DataJoint 2.3.5 inflates it whole before comparing. Here
a row is written past DataJoint (raw SQL, as an account with INSERT could) and read through neureg."""

from __future__ import annotations

import zlib

import datajoint as dj
import numpy as np
import pytest

from neureg.database.blobs import COMPRESSED, blob_limit, check_expansion, fetch1_blobs, fetch_blobs
from neureg.errors import StoreIntegrityError


def bomb(recorded: int, inflates_to: int) -> bytes:
    """A blob whose header records ``recorded`` bytes and whose stream inflates to ``inflates_to`` zeros."""
    return COMPRESSED + recorded.to_bytes(8, "little") + zlib.compress(b"\0" * inflates_to, 9)


def test_genuine_blobs_pass_unchanged():
    for value in (np.arange(10_000, dtype=np.float64), np.zeros((3, 4)), {"a": [1, 2]}, "text"):
        packed = dj.blob.pack(value)
        assert check_expansion(packed, "x") == packed
        decoded = dj.blob.unpack(packed, squeeze=False)
        assert np.array_equal(np.asarray(decoded), np.asarray(value)) if not isinstance(value, dict) else decoded


def test_expansion_beyond_the_record_or_the_limit_is_refused():
    with pytest.raises(StoreIntegrityError, match="expands to 1000000000000 bytes, over NEUREG_BLOB_MAX_MB"):
        check_expansion(bomb(10**12, 10), "t.col {'k': 1}")  # refused from the header alone
    with pytest.raises(StoreIntegrityError, match="expands to more than the 1000 bytes it records"):
        check_expansion(bomb(1000, 50_000_000), "t.col")  # 50 MB of zeros in ~50 kB: stops at 1001 bytes
    with pytest.raises(StoreIntegrityError, match="expands to less than"):
        check_expansion(bomb(5000, 10), "t.col")
    with pytest.raises(StoreIntegrityError, match="damaged"):
        check_expansion(COMPRESSED + (100).to_bytes(8, "little") + b"not zlib at all", "t.col")
    assert check_expansion(bomb(2000, 2000), "t.col", limit=2000)  # exactly what it records: fine


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEUREG_BLOB_MAX_MB", "1")
    assert blob_limit() == 2**20
    with pytest.raises(StoreIntegrityError, match="over NEUREG_BLOB_MAX_MB"):
        check_expansion(bomb(2**20 + 1, 2**20 + 1), "t.col")
    monkeypatch.setenv("NEUREG_BLOB_MAX_MB", "lots")
    with pytest.raises(ValueError, match="NEUREG_BLOB_MAX_MB='lots'"):
        blob_limit()


def test_a_planted_row_is_refused_naming_it_and_others_read_as_datajoint_reads_them(pipeline):
    schema = dj.Schema(pipeline.prefix + "blobtest")

    @schema
    class Held(dj.Manual):
        definition = """
        held_id : int32
        ---
        value : <blob>
        """

    try:
        genuine = np.random.default_rng(0).normal(size=(40, 40))
        Held.insert([{"held_id": 1, "value": genuine}, {"held_id": 2, "value": genuine}])
        table = Held.full_table_name
        Held.connection.query(f"UPDATE {table} SET value = %s WHERE held_id = 2", args=(bomb(1000, 20_000_000),))
        assert np.array_equal(fetch1_blobs(Held & {"held_id": 1}, "value"), (Held & {"held_id": 1}).fetch1("value"))
        with pytest.raises(StoreIntegrityError, match=r"held.*value \{'held_id': 2\}: the blob expands to more"):
            fetch_blobs(Held, "value")
    finally:
        schema.drop(prompt=False)
