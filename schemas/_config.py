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

import logging
from collections.abc import Callable

import datajoint as dj
import numpy as np

from ..database.store import load_array
from ..models.digests import stable_hash
from ..models.neural.oracle import LabeledSimilarity
from ..models.registry import Registry, added_keys, check_config_rules, complete_kwargs, hashed_form, retired_keys

logger = logging.getLogger("neureg")


def activator(schema: dj.Schema, stage: str) -> Callable[..., None]:
    """A stage module's ``activate(prefix, create_tables=True)``: binds its tables to ``{prefix}{stage}``
    on the current connection (``neureg.connect`` calls it for every stage)."""

    def activate(prefix: str = "neureg_", *, create_tables: bool = True) -> None:
        if create_tables:
            case_sensitive_database(f"{prefix}{stage}")
        schema.activate(f"{prefix}{stage}", create_tables=create_tables)

    activate.__doc__ = f"Bind the {stage} tables to ``{{prefix}}{stage}`` on the current connection."
    return activate


#: MySQL's collation for neureg's databases: binary, so text keys compare as on PostgreSQL ('SIM_M1' and
#: 'sim_m1' are two mice, 'a ' and 'a' two names). A server's default (utf8mb4_general_ci, latin1_swedish_ci)
#: would make them one key.
MYSQL_COLLATION = ("utf8mb4", "utf8mb4_bin")


def case_sensitive_database(name: str) -> None:
    """On MySQL/MariaDB, create ``name`` with a binary collation before DataJoint declares tables in it (its
    tables inherit it); warn once about an existing one that compares text without regard to case."""
    connection = dj.conn()
    if connection.adapter.backend != "mysql":
        return  # PostgreSQL compares text exactly
    rows = connection.query(
        "SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", args=(name,)
    ).fetchall()
    charset, collation = MYSQL_COLLATION
    if not rows:
        connection.query(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET {charset} COLLATE {collation}")
    elif not str(rows[0][0]).endswith(("_bin", "_cs")) and name not in _warned:
        _warned.add(name)
        logger.warning(
            "database %s compares text without regard to case (collation %s): mouse 'SIM_M1' and 'sim_m1' are "
            "one key there; docs/architecture.md ('One meaning for every id') says how to migrate it",
            name,
            rows[0][0],
        )


_warned: set[str] = set()


class ConfigTable:
    """Mixin for ``dj.Lookup`` config tables; ``config_name`` "x" declares ``x_hash`` / ``x_config`` / ``x_label``."""

    config_name: str
    settings: Callable | None = None  # a function whose keyword arguments are the config (models.registry)
    registry: Registry | None = None  # or a registry of variants: {registry.key: name, **builder kwargs}

    def __init_subclass__(cls, settings: Callable | None = None, registry: Registry | None = None, **kwargs):
        """``class NoiseConfig(ConfigTable, dj.Lookup, settings=f)`` (or ``registry=R``): the config is ``f``'s
        keyword arguments (or ``R``'s variants), and its name is the class name less "Config" ("noise")."""
        super().__init_subclass__(**kwargs)
        if settings is not None:
            cls.settings = staticmethod(settings)
        if registry is not None:
            cls.registry = registry
        if (settings or registry) and "config_name" not in cls.__dict__:
            cls.config_name = cls.__name__.removesuffix("Config").lower()
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
        retired = sorted(set(given) & set(retired_keys(cls.settings)))
        if retired:
            raise ValueError(
                f"{cls.__name__}: {retired} left the config: an execution setting now, which does not change "
                "results (docs/architecture.md, 'Configs that change')"
            )
        if cls.registry is not None:
            full = cls.registry.complete(given)
        else:
            full = complete_kwargs(cls.settings, given, cls.__name__)
            check_config_rules(cls.settings, full)  # rules across keys raise ValueError
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
            twin = cls.non_canonical().get(key[f"{cls.config_name}_hash"])
            if twin is not None:  # stored before values were canonical: that row is this config
                return {f"{cls.config_name}_hash": twin}
            cls.insert1(
                {**key, f"{cls.config_name}_config": full, f"{cls.config_name}_label": label[:64]}, skip_duplicates=True
            )
        return key

    @classmethod
    def key_of(cls, full: dict) -> dict:
        """The primary key of a completed config."""
        return {f"{cls.config_name}_hash": stable_hash(hashed_form(cls.settings, full))}

    @classmethod
    def config_of(cls, key: dict) -> dict:
        """The stored (complete) config of one key, in today's form: keys added since it was stored hold the
        values that do what it did, retired keys are left out (``models.registry.config_history``)."""
        return cls._today_form((cls() & key).fetch1(f"{cls.config_name}_config"))

    @classmethod
    def _today_form(cls, stored: dict) -> dict:
        retired = retired_keys(cls.settings)
        return {**added_keys(cls.settings), **{k: v for k, v in stored.items() if k not in retired}}

    @classmethod
    def non_canonical(cls) -> dict[str, str]:
        """Rows keyed before config values were canonical (``models.registry.canonical``) whose stored config
        is not in its canonical form (``alpha: 0`` where ``0.0`` is meant): {canonical hash: stored hash}.
        Their keys stay (results hang off them); :meth:`add` returns such a row for the config it holds, so
        ``alpha=0`` and ``alpha=0.0`` reach it as one row. A stored config that no longer validates is left out."""
        name = cls.config_name
        rows = zip(*cls().to_arrays(f"{name}_hash", f"{name}_config"))
        return stored_twins(rows, lambda stored: cls.key_of(cls.complete(cls._today_form(stored)))[f"{name}_hash"])


def stored_twins(rows, canonical_hash: Callable) -> dict[str, str]:
    """{canonical hash: stored hash} for the (stored hash, stored config) ``rows`` whose hash differs from
    ``canonical_hash(stored config)``: rows keyed before values were canonical. The first row of a canonical
    hash wins; a stored config that no longer validates (ValueError, TypeError) is left out."""
    twins = {}
    for stored_hash, stored in rows:
        try:
            canonical = canonical_hash(stored)
        except (ValueError, TypeError):
            continue
        if canonical != stored_hash:
            twins.setdefault(canonical, stored_hash)
    return twins


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
