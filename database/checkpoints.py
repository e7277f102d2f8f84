"""Where training checkpoints live: a folder only workers write (their digests are in ``training.Checkpoint``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datajoint as dj

from .connect import home_folder
from .settings import STORE

logger = logging.getLogger("neureg")


def checkpoint_dir() -> Path:
    """Per-epoch checkpoints, where a resumed run finds them: ``NEUREG_CHECKPOINTS`` if set (a cluster's shared
    scratch, so a requeued task resumes on another node); else beside a folder store, which every worker
    sharing it sees; else (an S3 store) under this host's ``NEUREG_HOME``, which only this host resumes from."""
    if os.environ.get("NEUREG_CHECKPOINTS"):
        return _workers_only(Path(os.environ["NEUREG_CHECKPOINTS"]).expanduser())
    store = (dj.config.stores or {}).get(STORE, {})
    base = Path(store["location"]) if store.get("protocol", "file") == "file" and store.get("location") else None
    base = base or home_folder()
    return _workers_only(base / "checkpoints")


def _workers_only(path: Path) -> Path:
    """Create the checkpoint folder for this (worker) user alone; warn about an existing one other users can
    write (its files are still checked against ``Checkpoint`` before any resume)."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)  # workers starting together may race here
    elif path.stat().st_mode & 0o022:
        logger.warning("the checkpoint folder %s is writable by other users (chmod go-w it)", path)
    return path
