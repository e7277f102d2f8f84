"""Where to start each unit's readout: classic receptive-field mapping by reverse correlation.

A Gaussian readout's position only feels the gradient of the feature map at (and, through the training
jitter, near) where it sits, so from a random start most of a short fit is spent letting positions
drift towards their receptive fields. Correlating each unit's responses with the stimulus at every
pixel finds the receptive field directly: the squared spike-triggered average marks linear (simple-cell)
receptive fields, the correlation with local contrast energy marks phase-invariant (complex-cell) ones.
Training then refines the position; a unit with no detectable receptive field gets a near-random start,
no worse than the alternative.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SMOOTH_PX = 1.5  # blur of the maps: RFs are several pixels wide, noise is pixel-to-pixel


def receptive_field_positions(images: np.ndarray, responses: np.ndarray, input_kernel: int) -> np.ndarray:
    """(n_units, 2) readout positions (x, y) in grid_sample units over the core's feature map.

    ``images`` (n_trials, H, W) as shown on each trial, ``responses`` (n_trials, n_units). The feature
    map is the image cropped by the first layer's valid convolution, ``input_kernel // 2`` pixels per
    side; positions are searched inside it.
    """
    n, height, width = images.shape
    x = images.astype(np.float32).reshape(n, -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    pix = x.reshape(n, height, width)
    detail = pix - ndimage.gaussian_filter(pix, (0, 2.0, 2.0), mode="nearest")
    energy = ndimage.gaussian_filter(detail**2, (0, 2.0, 2.0), mode="nearest").reshape(n, -1)
    energy = (energy - energy.mean(0)) / (energy.std(0) + 1e-6)
    r = responses.astype(np.float32)
    r = (r - r.mean(0)) / (r.std(0) + 1e-6)
    sta = (r.T @ x / n).reshape(-1, height, width)
    maps = [
        ndimage.gaussian_filter(sta**2, (0, SMOOTH_PX, SMOOTH_PX), mode="nearest"),
        ndimage.gaussian_filter(
            (r.T @ energy / n).reshape(-1, height, width), (0, SMOOTH_PX, SMOOTH_PX), mode="nearest"
        ),
    ]
    margin = input_kernel // 2
    crop = (slice(None), slice(margin, height - margin), slice(margin, width - margin))
    # Summed, not the better of the two: the squared STA's heavy-tailed peaks would win that vote
    # for complex cells too (on the simulator summing gave the smaller position error).
    score = _zscore(maps[0][crop]) + _zscore(maps[1][crop])
    fh, fw = score.shape[1:]
    row, col = np.unravel_index(score.reshape(len(score), -1).argmax(1), (fh, fw))
    return np.stack([2 * col / max(fw - 1, 1) - 1, 2 * row / max(fh - 1, 1) - 1], 1).astype(np.float32)


def _zscore(maps: np.ndarray) -> np.ndarray:
    """Per-unit standardization so the two maps vote with equal weight whatever their scale."""
    flat = maps.reshape(len(maps), -1)
    return ((flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-12)).reshape(maps.shape)
