"""The simulator's stimuli: natural-image crops, the contrast they carry, and eye-movement resampling.

Images are 36x64 uint8 crops of photographs that ship inside scikit-image. Units see them as Weber
contrast against the mid-grey screen; an eye movement resamples the whole image (``shift_images``);
divisive normalization reads the local RMS contrast around each receptive field (``local_contrast``).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

IMAGE_SHAPE = (36, 64)
POOL_SIGMA_PX = 6.0  # Gaussian sigma of the normalization pool (about 11 degrees)
SOURCE_PHOTOS = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "gravel",
    "brick",
    "grass",
    "coins",
    "moon",
    "clock",
    "retina",
    "cell",
    "stereo_motorcycle",
)  # photographs that ship inside scikit-image (no download); text, logos and binary shapes left out


@functools.lru_cache(maxsize=1)
def _photo_pyramids() -> tuple[np.ndarray, ...]:
    """Grayscale source photographs at downsampling factors 1x, 1.5x, ... 7.6x, float32 in [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import rescale

    levels = []
    for name in SOURCE_PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo
        level = (rgb2gray(photo[..., :3]) if photo.ndim == 3 else photo / 255.0).astype(np.float32)
        for _ in range(6):  # each level 1.5x smaller than the last, anti-aliased
            if level.shape[0] < IMAGE_SHAPE[0] + 4 or level.shape[1] < IMAGE_SHAPE[1] + 4:
                break
            levels.append(level)
            level = rescale(level, 1 / 1.5, anti_aliasing=True, order=1).astype(np.float32)
    return tuple(levels)


def natural_image_set(n_images: int, seed: int = 0, min_std: float = 10.0) -> np.ndarray:
    """``n_images`` distinct 36x64 uint8 crops of real photographs at random positions, scales and flips.

    Crops are drawn one at a time from one generator, so a smaller set is a prefix of a larger one with
    the same seed. Near-uniform crops (pixel std < ``min_std`` grey levels: sky, black background) are
    rejected because natural-image stimuli are textured. Scales with more crop positions are drawn more
    often (weight sqrt(positions)) so coarse levels do not yield many nearly identical crops.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    levels = _photo_pyramids()
    h, w = IMAGE_SHAPE
    positions = np.array([(lv.shape[0] - h + 1) * (lv.shape[1] - w + 1) for lv in levels], dtype=float)
    weights = np.sqrt(positions) / np.sqrt(positions).sum()
    rng = np.random.default_rng(seed)
    images, seen = [], set()
    while len(images) < n_images:
        level = levels[rng.choice(len(levels), p=weights)]
        y = rng.integers(level.shape[0] - h + 1)
        x = rng.integers(level.shape[1] - w + 1)
        crop = level[y : y + h, x : x + w]
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        pixels = np.clip(np.rint(crop * 255), 0, 255).astype(np.uint8)
        key = pixels.tobytes()
        if pixels.std() >= min_std and key not in seen:
            seen.add(key)
            images.append(pixels)
    return np.stack(images)


def to_contrast(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> Weber contrast against the mid-grey screen, float32 in [-1, 1]."""
    return (np.asarray(images, dtype=np.float32) - 127.5) / 127.5


def shift_images(contrast: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Resample each image so that pixel p shows what was at ``p + shift`` (bilinear, edges replicated).

    A unit whose filter sits at ``c`` then sees the content originally at ``c + shift``: its receptive
    field moved by ``shift`` = (dx, dy) pixels. The whole image moves together, so each image needs one
    integer offset into an edge-padded copy and one pair of interpolation weights.
    """
    n, h, w = contrast.shape
    shifts = np.asarray(shifts, dtype=np.float64).reshape(n, 2)
    margin = int(np.ceil(np.abs(shifts).max(initial=0))) + 1
    padded = np.pad(contrast, ((0, 0), (margin, margin), (margin, margin)), mode="edge")
    whole = np.floor(shifts).astype(np.intp)
    fx, fy = ((shifts - whole).astype(np.float32)[:, k, None, None] for k in (0, 1))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h + 1, w + 1), axis=(1, 2))
    block = windows[np.arange(n), margin + whole[:, 1], margin + whole[:, 0]]  # (n, h + 1, w + 1)
    top = block[:, :-1, :-1] * (1 - fx) + block[:, :-1, 1:] * fx
    bottom = block[:, 1:, :-1] * (1 - fx) + block[:, 1:, 1:] * fx
    return top * (1 - fy) + bottom * fy


@functools.lru_cache(maxsize=8)
def _blur_matrices(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blur along rows and columns (edges replicated) as matrices, so a batch blurs in two matmuls."""
    h, w = IMAGE_SHAPE
    rows = ndimage.gaussian_filter1d(np.eye(h), sigma, axis=0, mode="nearest").astype(np.float32)
    cols = ndimage.gaussian_filter1d(np.eye(w), sigma, axis=0, mode="nearest").astype(np.float32)
    return rows, np.ascontiguousarray(cols.T)


def local_contrast(contrast: np.ndarray, sigma: float = POOL_SIGMA_PX) -> np.ndarray:
    """RMS contrast around every pixel: the normalization pool each unit reads at its RF centre."""
    rows, cols_t = _blur_matrices(float(sigma))
    blur = lambda x: np.matmul(rows, x @ cols_t)  # noqa: E731
    detail = contrast - blur(contrast)
    return np.sqrt(np.maximum(blur(detail * detail), 0))
