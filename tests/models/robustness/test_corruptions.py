"""Grayscale corruptions and the CIFAR-10-C loader (on fake files in the exact layout)."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from neureg.models.robustness.corruptions import (
    CORRUPTIONS,
    PARAMETERS,
    SEVERITIES,
    corrupt,
    corruption_accuracy,
    load_cifar10c,
    rgb_to_gray,
)
from neureg.models.runtime import accuracy


@pytest.fixture(scope="module")
def images():
    """Smooth random 'natural-ish' images spanning [0.1, 0.9]."""
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((12, 1, 32, 32)), sigma=(0, 0, 1.5, 1.5))
    x = (x - x.min()) / (x.max() - x.min())
    return (0.1 + 0.8 * x).astype(np.float32)


def test_the_issue_corruptions_exist_with_five_severities():
    assert {"gaussian_noise", "shot_noise", "contrast", "jpeg_compression"} <= set(CORRUPTIONS)
    assert {"gaussian_blur", "defocus_blur"} & set(CORRUPTIONS)
    assert set(PARAMETERS) == set(CORRUPTIONS)
    assert all(len(PARAMETERS[name]) == len(SEVERITIES) == 5 for name in CORRUPTIONS)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_range_shape_and_monotone_severity(images, name):
    distances = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        distances.append(np.sqrt(((out - images) ** 2).sum(axis=(1, 2, 3))).mean())
    assert distances[0] > 0
    assert np.all(np.diff(distances) > 0), distances


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_seeded_and_input_untouched(images, name):
    before = images.copy()
    a = corrupt(images, name, 3, seed=7)
    b = corrupt(torch.from_numpy(images), name, 3, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(images, before)
    if name in ("gaussian_noise", "shot_noise"):
        assert not np.array_equal(a, corrupt(images, name, 3, seed=8))


def test_corruptions_accept_unbatched_and_channel_free_shapes(images):
    for name in CORRUPTIONS:
        assert corrupt(images[:, 0], name, 2, seed=0).shape == images[:, 0].shape
        assert corrupt(images[0, 0], name, 2, seed=0).shape == (32, 32)


def test_blur_and_contrast_preserve_mean_and_constants(images):
    flat = np.full((2, 1, 32, 32), 0.4, dtype=np.float32)
    for name in ("gaussian_blur", "defocus_blur", "contrast"):
        np.testing.assert_allclose(corrupt(flat, name, 5, seed=0), flat, atol=1e-6)
    contrasted = corrupt(images, "contrast", 5, seed=0)
    np.testing.assert_allclose(contrasted.mean(axis=(2, 3)), images.mean(axis=(2, 3)), atol=1e-5)


def test_gaussian_noise_has_the_stated_sigma():
    flat = np.full((4, 1, 32, 32), 0.5, dtype=np.float32)  # far from the clip at 0 and 1
    for severity, sigma in zip(SEVERITIES, PARAMETERS["gaussian_noise"]):
        assert (corrupt(flat, "gaussian_noise", severity, seed=1) - flat).std() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("bad", [0, 6, 2.5, True])
def test_bad_severity_raises(images, bad):
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", bad, seed=0)


def test_unknown_corruption_raises(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1, seed=0)


def test_corruption_accuracy_is_accuracy_on_corrupted_images(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 3)).eval()
    labels = np.arange(len(images)) % 3
    value = corruption_accuracy(model, images, labels, "gaussian_noise", 4, seed=3)
    assert value == accuracy(model, corrupt(images, "gaussian_noise", 4, seed=3), labels)
    assert 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------------
# CIFAR-10-C
# ---------------------------------------------------------------------------------------------------


def write_fake_cifar10c(folder, n_per_severity, name="gaussian_noise"):
    """Files in the CIFAR-10-C layout, all zero but for a marker pixel in each block's first rows.

    Writing only a few rows keeps the 150 MB full-size file sparse on disk.
    """
    n = 5 * n_per_severity
    data = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.uint8, shape=(n,))
    for severity in SEVERITIES:
        block = slice((severity - 1) * n_per_severity, severity * n_per_severity)
        first_rows = slice(block.start, block.start + min(3, n_per_severity))
        data[first_rows, 0, 0, :] = (10 * severity, 100, 200)
        labels[block] = severity
    data.flush()
    labels.flush()


def test_load_cifar10c_full_layout(tmp_path):
    write_fake_cifar10c(tmp_path, 10000)  # (50000, 32, 32, 3): mostly zeros on disk
    images, labels = load_cifar10c(tmp_path, "gaussian_noise", 3)
    assert images.shape == (10000, 1, 32, 32) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int64 and np.all(labels == 3)
    expected = (0.299 * 30 + 0.587 * 100 + 0.114 * 200) / 255
    np.testing.assert_allclose(images[:3, 0, 0, 0], expected, rtol=1e-6)
    assert images[:, 0, 1:, :].max() == 0 and images[3:].max() == 0


def test_load_cifar10c_small_file_and_each_severity(tmp_path):
    write_fake_cifar10c(tmp_path, 4, name="contrast")
    for severity in SEVERITIES:
        images, labels = load_cifar10c(str(tmp_path), "contrast", severity)
        assert images.shape == (4, 1, 32, 32) and np.all(labels == severity)
        red = (images[:3, 0, 0, 0] * 255 - 0.587 * 100 - 0.114 * 200) / 0.299
        np.testing.assert_allclose(red, 10 * severity, rtol=1e-5)


def test_rgb_to_gray_weights():
    pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_gray(pixels), [0.299, 0.587, 0.114, 1.0], rtol=1e-6)


def test_load_cifar10c_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10c(tmp_path / "nowhere", "contrast", 1)
    write_fake_cifar10c(tmp_path, 2, name="contrast")
    with pytest.raises(FileNotFoundError, match="contrast"):  # the message lists what is there
        load_cifar10c(tmp_path, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(tmp_path, "contrast", 6)
    np.save(tmp_path / "gray.npy", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_cifar10c(tmp_path, "gray", 1)
    np.save(tmp_path / "odd.npy", np.zeros((12, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_cifar10c(tmp_path, "odd", 1)
    np.save(tmp_path / "floats.npy", np.zeros((10, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        load_cifar10c(tmp_path, "floats", 1)
    np.save(tmp_path / "short.npy", np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_cifar10c(tmp_path, "short", 1)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels"):
        load_cifar10c(tmp_path, "contrast", 1)
