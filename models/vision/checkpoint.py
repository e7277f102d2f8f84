"""Per-epoch training checkpoints: written atomically, resumed only by the very same run.

A checkpoint carries a fingerprint of what defines the run (configs, seed, the exact training data and
similarity target); resuming under another fingerprint is refused rather than silently mixing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..digests import feed_array, file_digest
from .datasets import ClassificationData, dataset_checksum

CHECKPOINT_FORMAT = 1


def run_fingerprint(configs: dict, seed: int, dataset: ClassificationData, stimuli, target) -> str:
    """What a checkpoint must match to be resumed: configs, seed, and the exact data and target."""
    digest = hashlib.sha256(json.dumps({"configs": configs, "seed": seed}, sort_keys=True, default=str).encode())
    digest.update(dataset_checksum(dataset).encode())
    for array in (stimuli, target):
        if array is not None:
            feed_array(digest, array.detach().cpu().numpy(), "{dtype}:{shape};")
    return digest.hexdigest()


def save_checkpoint(path: Path, fingerprint: str, model: nn.Module, optimizer, regularizer, history) -> str:
    """Write the finished epoch: temporary file in the same folder, fsync, rename (old or new, never half).
    Returns the file's SHA-256, for the caller to record where the file's writer alone can (a forged or
    damaged checkpoint is then refused before it is resumed)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": len(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "regularizer": regularizer.state_dict() if regularizer is not None else None,
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    digest = file_digest(temporary)
    os.replace(temporary, path)
    return digest


def load_checkpoint(path: Path | None, fingerprint: str, device: torch.device) -> dict | None:
    """The checkpoint's state if ``path`` exists (None if not); ValueError if it is another run's."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {path} belongs to a different run; delete it to start over")
    return state
