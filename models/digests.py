"""Every content hash neureg takes, in one module: configs and sets become keys, arrays get digests.

- :func:`stable_hash`: 32 hex digits of SHA-256 over canonical JSON (sorted keys, no whitespace, numpy
  scalars and arrays as plain lists, dates as ISO strings): a config table's key, a scan set's key.
- :func:`array_digest`: SHA-256 over an array's dtype, shape and C-order bytes, whatever its memory
  layout: every stored array's ``*_sha256`` column, a dataset's checksum, a checkpoint's fingerprint.
- :func:`image_hash`: an ``experiment.Image`` key, the same digest of the pixels in its own framing.
- :func:`file_digest`: SHA-256 of a file named by a config (VGG weights), so a row records which file.

All three are written into existing databases as keys or recorded checksums, so each framing is frozen: a
change of framing would turn every recorded value into a mismatch. :func:`feed_array` is the one routine
that feeds an array into a digest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json

import numpy as np

HASH_LENGTH = 32


def plain(value):
    """``value`` as plain JSON-able Python: numpy scalars and arrays, tuples and dates made plain, recursively.
    The one converter for hashing, JSON columns and printed keys."""
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"config keys must be strings, got {bad!r}")
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


def _checked(value):
    value = plain(value)
    if isinstance(value, dict):
        return {k: _checked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_checked(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"configs cannot hold {value}: it has no stable JSON form")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot hash a {type(value).__name__}: configs hold numbers, strings, lists and dicts")


def canonical_json(value) -> str:
    """One JSON text per value (sorted keys, no spaces, no NaN): what a stable hash is taken of."""
    return json.dumps(_checked(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stable_hash(value) -> str:
    """32 hex digits of sha256 over the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:HASH_LENGTH]


def feed_array(digest, array, header: str) -> None:
    """Feed ``header`` (the caller's framing of dtype and shape) and then the array's C-order bytes."""
    array = np.ascontiguousarray(array)
    digest.update(header.format(dtype=array.dtype.str, shape=array.shape).encode())
    digest.update(memoryview(array).cast("B") if array.size else b"")


def array_digest(array, header: str = "{dtype}|{shape}|") -> str:
    """Hex SHA-256 over the array's dtype and shape (framed by ``header``) and its C-order bytes: equal for
    equal arrays, whatever the file layout."""
    digest = hashlib.sha256()
    feed_array(digest, array, header)
    return digest.hexdigest()


def file_digest(path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (a weights file named by a config: which one was used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_hash(pixels: np.ndarray) -> str:
    """Content address of an image: the same pixels give the same id in every scan and every lab."""
    return array_digest(pixels, header="{dtype}{shape}")[:HASH_LENGTH]
