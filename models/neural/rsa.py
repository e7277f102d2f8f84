"""Representational similarity: the one definition every stage shares (docs/science.md §2)."""

from __future__ import annotations

import numpy as np


def centered_cosine(responses: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """S_ij = e_i . e_j with e_i = (r_i - rbar) / ||r_i - rbar||.

    ``responses`` is (n_images, n_features); ``rbar`` is the mean over images unless ``center`` is given
    (the oracle similarity centres on the mean over all repeats). An image whose centred vector is zero
    gets a zero row rather than NaNs, so a silent image cannot poison a target.
    """
    r = np.asarray(responses, dtype=np.float64)
    rbar = r.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    e = r - rbar
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    return e @ e.T
