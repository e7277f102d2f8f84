"""Stable content hashes: configs and sets of scans become primary keys (the nnfabrik way).

The hash is over canonical JSON (sorted keys, no whitespace, numpy scalars and arrays as plain lists,
dates as ISO strings), so the same content gives the same key in every process, on every machine, and
any change of content gives a different one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json

import numpy as np

HASH_LENGTH = 32


def _plain(value):
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"config keys must be strings, got {bad!r}")
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"configs cannot hold {value}: it has no stable JSON form")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot hash a {type(value).__name__}: configs hold numbers, strings, lists and dicts")


def canonical_json(value) -> str:
    """One JSON text per value (sorted keys, no spaces, no NaN): what a stable hash is taken of."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stable_hash(value) -> str:
    """32 hex digits of sha256 over the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:HASH_LENGTH]
