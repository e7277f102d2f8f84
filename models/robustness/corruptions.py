"""Common corruptions on grayscale images, and the CIFAR-10-C files converted to grayscale.

Two sources, one accuracy function. The demo cannot ship CIFAR-10-C (2.9 GB), so five corruptions
are implemented here directly on grayscale [0, 1] images with Hendrycks & Dietterich's CIFAR-10-C
parameters (``make_cifar_c.py`` of github.com/hendrycks/robustness; ICLR 2019), severity 1 to 5:

=================  =========================================  ======================================
corruption         severity 1 .. 5                            operation
=================  =========================================  ======================================
gaussian_noise     sigma 0.04, 0.06, 0.08, 0.09, 0.10         clip(x + N(0, sigma^2))
shot_noise         photons 500, 250, 100, 75, 50              clip(Poisson(x * photons) / photons)
gaussian_blur      sigma 0.4, 0.6, 0.7, 0.8, 1.0 px           Gaussian filter, edge pixels repeated
defocus_blur       (radius, alias sigma) (0.3, 0.4),          disk kernel smoothed by a 3 x 3
                   (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5,    Gaussian, edges mirrored (cv2's
                   0.1)                                       REFLECT_101, as the original)
contrast           factor 0.75, 0.5, 0.4, 0.3, 0.15           (x - mean) * factor + mean, per image
jpeg_compression   quality 80, 65, 58, 50, 40                 PIL JPEG round trip
=================  =========================================  ======================================

Differences from the RGB originals, all deliberate: everything is computed on the one luma channel,
so JPEG quantizes only luma (the original's chroma loss has no grayscale counterpart); results stay
float, whereas CIFAR-10-C stores uint8 (only JPEG quantizes to 1/255 here, as it must); and the
random corruptions draw from ``numpy.random.default_rng(seed)``, so a (seed, corruption, severity)
triple always gives the same images.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..runtime import DEFAULT_BATCH_SIZE, accuracy, as_image_tensor

SEVERITIES = (1, 2, 3, 4, 5)

#: ITU-R BT.601 luma weights for R, G, B (what PIL's convert("L") and torchvision's Grayscale use).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

PARAMETERS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def _gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=sigma, size=x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    # skimage.filters.gaussian's defaults (mode "nearest", truncate 4), over the two image axes only.
    sigmas = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(x, sigma=sigmas, mode="nearest", truncate=4.0)


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The original's disk(): a pixelated disk on a 17 x 17 grid, antialiased by a 3 x 3 Gaussian."""
    half = 8 if radius <= 8 else int(np.ceil(radius))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_sigma**2))  # cv2.GaussianBlur, ksize 3
    taps /= taps.sum()
    disk = ndimage.convolve1d(disk, taps, axis=0, mode="mirror")
    return ndimage.convolve1d(disk, taps, axis=1, mode="mirror")


def _defocus_blur(x: np.ndarray, radius_and_alias: tuple, rng: np.random.Generator) -> np.ndarray:
    kernel = _disk_kernel(*radius_and_alias)
    kernel = kernel.reshape((1,) * (x.ndim - 2) + kernel.shape)
    return ndimage.correlate(x, kernel, mode="mirror")


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(-2, -1), keepdims=True)
    return (x - mean) * factor + mean


def _jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    flat = x.reshape((-1,) + x.shape[-2:])
    out = np.empty_like(flat)
    for k, image in enumerate(flat):
        buffer = io.BytesIO()
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=int(quality)
        )
        buffer.seek(0)
        out[k] = np.asarray(Image.open(buffer), dtype=np.float64) / 255.0
    return out.reshape(x.shape)


#: name -> f(images as float64 (..., H, W), severity parameter, rng) -> corrupted (unclipped) images.
CORRUPTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "jpeg_compression": _jpeg_compression,
}


def _check_severity(severity: int) -> int:
    if severity not in SEVERITIES or isinstance(severity, bool):
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return int(severity)


def corrupt(images, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupted copy of grayscale images in [0, 1] (any shape ending in H, W), float32, in [0, 1]."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    severity = _check_severity(severity)
    x = as_image_tensor(images).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    out = CORRUPTIONS[corruption](x, PARAMETERS[corruption][severity - 1], rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def corruption_accuracy(
    model, images, labels, corruption: str, severity: int, seed: int, batch_size: int = DEFAULT_BATCH_SIZE, device=None
) -> float:
    """Accuracy of ``model`` on the images corrupted by one of :data:`CORRUPTIONS` at ``severity``."""
    return accuracy(model, corrupt(images, corruption, severity, seed), labels, batch_size, device)


def rgb_to_gray(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) to float32 luma in [0, 1] (..., H, W), not re-quantized."""
    return (np.asarray(images, dtype=np.float64) @ LUMA_WEIGHTS / 255.0).astype(np.float32)


def load_cifar10c(path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """One corruption and severity of CIFAR-10-C as grayscale (N, 1, 32, 32) float32 and int64 labels.

    ``path`` is the folder as distributed (``<corruption>.npy`` of shape (50000, 32, 32, 3) uint8,
    ``labels.npy`` of shape (50000,)): the five severities are stacked in equal blocks (10000 test
    images each, severity 1 first), so any first dimension divisible by 5 is accepted. Files are
    memory-mapped, so only the requested block is read. Grayscale is ITU-R 601 luma, kept as float.
    """
    severity = _check_severity(severity)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10-C folder {folder} does not exist (download CIFAR-10-C from "
            f"zenodo.org/record/2535967 and point to the extracted folder)"
        )
    data_file, label_file = folder / f"{corruption}.npy", folder / "labels.npy"
    for needed in (data_file, label_file):
        if not needed.is_file():
            present = sorted(p.stem for p in folder.glob("*.npy"))
            raise FileNotFoundError(f"{needed} not found; .npy files in {folder}: {present or 'none'}")
    data = np.load(data_file, mmap_mode="r")
    labels = np.load(label_file, mmap_mode="r")
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.shape[0] % len(SEVERITIES):
        raise ValueError(
            f"{data_file} has shape {data.shape}; expected (5 * n, 32, 32, 3), (50000, 32, 32, 3) for CIFAR-10-C"
        )
    if data.dtype != np.uint8:
        raise ValueError(f"{data_file} has dtype {data.dtype}; expected uint8")
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{label_file} has shape {labels.shape}; expected ({data.shape[0]},) to match {data_file.name}"
        )
    block = data.shape[0] // len(SEVERITIES)
    rows = slice((severity - 1) * block, severity * block)
    gray = np.empty((block, 1, 32, 32), dtype=np.float32)
    for start in range(0, block, 1000):  # chunks keep the float64 intermediate small
        stop = min(start + 1000, block)
        gray[start:stop, 0] = rgb_to_gray(data[rows][start:stop])
    return gray, np.asarray(labels[rows], dtype=np.int64)
