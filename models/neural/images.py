"""Stimulus images at the resolution a model sees them (docs/science.md, "Image resolution").

Scans store the images as shown (Sensorium: 144x256). The field fits predictive models, and regularizes
networks, at a quarter of that (36x64): neuralpredictors rescales by 0.25 with scikit-image's bilinear
``rescale`` without anti-aliasing, keeping the 0..255 range. ``downsample`` applies that one rule, then
rounds to uint8 (half to even), so every stage that asks for a scale gets the same pixels.
"""

from __future__ import annotations

import numpy as np


def downsampled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) after ``downsample`` at ``scale``: each side rounded, at least one pixel."""
    return tuple(max(1, int(round(side * scale))) for side in shape)


def downsample(images: np.ndarray, scale: float) -> np.ndarray:
    """uint8 images (n, H, W) rescaled by ``scale`` in (0, 1] (bilinear, no anti-aliasing), as uint8.

    ``scale`` 1 returns the images unchanged (no copy), so full-resolution configs cost nothing.
    """
    images = np.asarray(images)
    if not 0 < scale <= 1:
        raise ValueError(f"image scale must lie in (0, 1], got {scale}")
    if scale == 1:
        return images
    from skimage.transform import resize

    height, width = downsampled_shape(images.shape[1:], scale)
    out = np.empty((len(images), height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = resize(
            image.astype(np.float64), (height, width), order=1, anti_aliasing=False, preserve_range=True, mode="reflect"
        )
        out[i] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return out
