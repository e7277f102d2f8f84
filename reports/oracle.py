"""`neureg report oracle`: Fig. 1A (S^oracle of each scan in one image order) and Fig. 1C (fluctuations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..database.blobs import fetch_blobs
from ..models.neural import oracle
from ._plot import cluster_order, plt, save, symmetric_limit


def oracle_figures(pipeline, out: Path) -> list[Path]:
    """One pair of PNGs per ScanSet that has a ScanStability row; returns the paths written."""
    exp, orc = pipeline.experiment, pipeline.oracle
    paths = []
    for set_key in orc.ScanStability.keys(order_by="KEY"):
        members = (exp.ScanSet.Member & set_key).keys(order_by="KEY")
        aligned = oracle.align_similarities([(orc.OracleSimilarity & m).labeled() for m in members])
        paths.append(_similarity_grid(aligned.matrix, members, out, set_key["scan_set"][:8]))
        blobs = ("bin_edges", "scan_hist", "repeat_hist")
        stability = orc.ScanStability & set_key
        row = stability.proj(*(n for n in stability.heading.secondary_attributes if n not in blobs)).fetch1()
        row.update(fetch_blobs(stability, *blobs)[0])
        paths.append(_fluctuation_histograms(row, out, set_key["scan_set"][:8]))
    if not paths:
        raise LookupError(
            "no ScanStability rows yet: ingest two or more scans sharing oracle images and populate the oracle stage"
        )
    return paths


def _similarity_grid(stack: np.ndarray, members: list[dict], out: Path, tag: str) -> Path:
    order = cluster_order(stack.mean(axis=0))
    limit = symmetric_limit(stack)
    n = len(members)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, matrix, member in zip(axes.flat, stack, members):
        image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{member['mouse']} session {member['session']} scan {member['scan_idx']}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="S^oracle")
    fig.suptitle(f"Oracle similarity of {stack.shape[1]} shared oracle images, one image order (Fig. 1A)")
    return save(fig, out, f"oracle_similarity_{tag}.png")


def _fluctuation_histograms(row: dict, out: Path, tag: str) -> Path:
    edges = np.asarray(row["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("scan_hist", "ΔS scan (eq. 4)"), ("repeat_hist", "ΔS repeat (eq. 5)")):
        counts = np.asarray(row[name], dtype=float)
        ax.step(centers, counts / counts.sum(), where="mid", label=f"{label}, std {row[name[:-5] + '_std']:.3f}")
    ax.set_xlabel("fluctuation")
    ax.set_ylabel("fraction")
    ax.set_title(f"Across scans vs across repeats ({row['n_scans']} scans, Fig. 1C)")
    ax.legend(fontsize=8)
    return save(fig, out, f"oracle_fluctuations_{tag}.png")
