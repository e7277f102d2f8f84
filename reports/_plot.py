"""Shared plotting helpers: a headless backend and one way to order images for display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402


def cluster_order(similarity: np.ndarray) -> np.ndarray:
    """Image order that puts similar images together (average-linkage on 1 - S), as in Fig. 1A."""
    distance = np.clip(1.0 - np.asarray(similarity, dtype=np.float64), 0.0, None)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    if len(distance) < 3:
        return np.arange(len(distance))
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def save(fig, out: Path, name: str) -> Path:
    """Write ``fig`` as ``out/name`` and close it (a report makes many figures; open ones hold memory)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def symmetric_limit(matrices) -> float:
    """One colour limit for several similarity matrices: the 99th percentile of their off-diagonal |values|,
    so one extreme entry does not wash out the rest and the panels compare by colour."""
    off = [np.abs(m[~np.eye(len(m), dtype=bool)]) for m in matrices if len(m) > 1]
    return float(max((np.quantile(o, 0.99) for o in off), default=1.0)) or 1.0
