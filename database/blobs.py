"""``<blob>`` values read with their expansion bounded: a compressed blob may not inflate past what it records.

DataJoint 2.3.5 decompresses a ``<blob>`` whole and only then compares its length with the size recorded in
its header, so a few kilobytes in a row can ask for terabytes of memory (fixed in 2.3.6, which these
machines cannot install). neureg reads every ``<blob>`` it computes from through :func:`fetch_blobs`: the
row's raw bytes (DataJoint's ``cursor``, as ``store_references`` reads references), the recorded size
checked against ``NEUREG_BLOB_MAX_MB`` (default 4096), the stream inflated at most one byte past that size
and required to end exactly there; only then does DataJoint's own decoder (``datajoint.blob.unpack``, what
its ``<blob>`` codec calls) turn it into a value. Lab accounts cannot write any ``<blob>`` column (their
only table with pixels stores raw bytes), so such a row could only come from a worker or an administrator.
"""

from __future__ import annotations

import os
import zlib

from datajoint import blob as dj_blob

from ..errors import StoreIntegrityError

COMPRESSED = b"ZL123\0"  # DataJoint's header of a zlib-compressed blob, then its uncompressed size (uint64)
HEADER = len(COMPRESSED) + 8
CHUNK = 1 << 24


def blob_limit() -> int:
    """The largest size a ``<blob>`` may expand to, in bytes (``NEUREG_BLOB_MAX_MB``, default 4096)."""
    value = os.environ.get("NEUREG_BLOB_MAX_MB", "4096")
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"NEUREG_BLOB_MAX_MB={value!r} is not a number of megabytes") from None
    return int(megabytes * 2**20)


def check_expansion(raw, where: str, limit: int | None = None) -> bytes:
    """``raw`` as bytes if it is uncompressed, or compressed and inflating to exactly its recorded size (at most
    ``limit``); else a StoreIntegrityError naming ``where``. Memory stays within the recorded size."""
    raw = bytes(raw)
    if not raw.startswith(COMPRESSED):
        return raw
    limit = blob_limit() if limit is None else limit
    recorded = int.from_bytes(raw[len(COMPRESSED) : HEADER], "little")

    def refused(fault: str) -> StoreIntegrityError:
        return StoreIntegrityError(f"{where}: {fault}", path="", fault=fault)

    if recorded > limit:
        raise refused(f"the blob says it expands to {recorded} bytes, over NEUREG_BLOB_MAX_MB ({limit} bytes)")
    inflater = zlib.decompressobj()
    produced, data = 0, raw[HEADER:]
    try:
        while data and produced <= recorded:
            produced += len(inflater.decompress(data, min(CHUNK, recorded + 1 - produced)))
            data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise refused(f"the compressed blob is damaged ({exc})") from None
    if produced != recorded or not inflater.eof:
        raise refused(
            f"the blob expands to {'more' if produced > recorded else 'less'} than the {recorded} bytes it records"
        )
    return raw


def fetch_blobs(query, *attributes: str) -> list[dict]:
    """The rows of ``query`` (primary key and ``attributes``, which are ``<blob>`` columns) as dicts, each blob
    checked by :func:`check_expansion` before DataJoint decodes it."""
    names = [*query.primary_key, *(a for a in attributes if a not in query.primary_key)]
    rows = []
    for row in query.proj(*attributes).cursor(as_dict=True):
        key = {name: row[name] for name in query.primary_key}
        for attribute in attributes:
            if row[attribute] is not None:
                raw = check_expansion(row[attribute], f"{query.full_table_name}.{attribute} {key}")
                row[attribute] = dj_blob.unpack(raw, squeeze=False)
        rows.append({name: row[name] for name in names})
    return rows


def fetch1_blobs(query, *attributes: str):
    """Like DataJoint's ``fetch1(*attributes)`` for ``<blob>`` columns of one row: one value, or a tuple."""
    rows = fetch_blobs(query, *attributes)
    if len(rows) != 1:
        raise ValueError(f"{query.full_table_name}: expected one row, found {len(rows)}")
    values = tuple(rows[0][a] for a in attributes)
    return values[0] if len(values) == 1 else values
