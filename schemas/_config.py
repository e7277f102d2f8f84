"""Shared table shapes: config tables keyed by a hash (nnfabrik's idea) and matrices whose rows are images.

Config tables: a config is completed with its defaults *before* hashing, so ``{}`` and the spelled-out
defaults are one row, and the stored JSON is exactly what the run used. The defaults, unknown-key checks
and value rules come from one function's signature (``models.registry``): a table names either the
``settings`` function whose keyword arguments are its config, or the ``registry`` of variants. Unknown
keys and invalid values are refused before anything is written.

Matrix tables: a stored matrix's rows are ``experiment.Image`` rows, kept in an ``Image`` part with the
row index, so every row carries its lineage; ``labeled()`` is the one reader of such a matrix.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import datajoint as dj
import numpy as np

from ..hashing import stable_hash
from ._store import load_array
from ..models.neural.oracle import LabeledSimilarity
from ..models.registry import Registry, complete_kwargs


class ConfigTable:
    """Mixin for ``dj.Lookup`` config tables; ``config_name`` "x" declares ``x_hash`` / ``x_config`` / ``x_label``."""

    config_name: str
    settings: Callable | None = None  # a function whose keyword arguments are the config; its body checks across keys
    registry: Registry | None = None  # or a registry of variants: {registry.key: name, **builder kwargs}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("config_name")
        if name and "definition" not in cls.__dict__:
            cls.definition = f"""
            {name}_hash : char(32)       # stable hash of the complete config
            ---
            {name}_config : json
            {name}_label = '' : varchar(64)
            """

    @classmethod
    def complete(cls, config: dict | None = None, **overrides) -> dict:
        """Defaults, updated by ``config`` and ``overrides``; unknown keys and invalid values raise ValueError."""
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"{cls.__name__}: a config is a dict, got {type(config).__name__}")
        given = {**(config or {}), **overrides}
        if cls.registry is not None:
            full = cls.registry.complete(given)
        else:
            full = complete_kwargs(cls.settings, given, cls.__name__)
            cls.settings(**full)  # rules across keys raise ValueError
        full = cls.check_references(full)
        stable_hash(full)  # raises on values without a stable JSON form
        return full

    @classmethod
    def check_references(cls, full: dict) -> dict:
        """Rows of other tables a config names must exist; reads only, never writes. Override to check."""
        return full

    @classmethod
    def add(cls, config: dict | None = None, label: str = "", **overrides) -> dict:
        """Insert the completed config if new; return its key either way."""
        full = cls.complete(config, **overrides)
        key = cls.key_of(full)
        if not (cls() & key):
            cls.insert1({**key, f"{cls.config_name}_config": full, f"{cls.config_name}_label": label[:64]},
                        skip_duplicates=True)
        return key

    @classmethod
    def key_of(cls, full: dict) -> dict:
        """The primary key of a completed config."""
        return {f"{cls.config_name}_hash": stable_hash(full)}

    @classmethod
    def config_of(cls, key: dict) -> dict:
        """The stored (complete) config of one key."""
        return (cls() & key).fetch1(f"{cls.config_name}_config")


class ImageRows(dj.Part):
    """Rows of the master's matrix: each one an ``experiment.Image`` (subclass it as the master's ``Image``)."""

    definition = """
    -> master
    -> experiment.Image
    ---
    row_index        : int32
    """

    @classmethod
    def rows(cls, key: dict, hashes) -> list[dict]:
        """Part rows for a matrix whose row i is image ``hashes[i]``."""
        return [dict(key, image_hash=str(h), row_index=i) for i, h in enumerate(hashes)]


class ImageMatrix:
    """Mixin for masters storing one matrix (attribute ``matrix_attribute``) whose rows are images."""

    matrix_attribute: str = "similarity"

    def labeled(self) -> LabeledSimilarity:
        """(image hashes in row order, the matrix) of one row: the one reader of such a matrix."""
        hashes = np.atleast_1d((self.Image & self).to_arrays("image_hash", order_by="row_index")).astype(str)
        return LabeledSimilarity(hashes, load_array(type(self), self.fetch1("KEY"), self.matrix_attribute))


@contextlib.contextmanager
def transaction(connection):
    """DataJoint's transaction, or the caller's if one is already open on this connection.

    DataJoint refuses to nest transactions; a step that must be atomic on its own (a scan set, a training
    plan) may also run inside a larger one (``neureg plan paper`` registers a whole experiment at once),
    and then it simply joins it.
    """
    if connection.in_transaction:
        yield
        return
    with connection.transaction:
        yield
