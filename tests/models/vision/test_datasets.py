"""Dataset loaders: CIFAR pickle round trip and its errors, the MNIST demo, the lineage checksum."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from neureg.models.vision.datasets import (
    CIFAR10_FOLDER,
    CIFAR100_FOLDER,
    ClassificationData,
    DatasetError,
    dataset_checksum,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_mnist_demo,
)


def _rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write(path, payload):
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def _expected_gray(rows):
    r, g, b = (rows[:, i * 1024 : (i + 1) * 1024].astype(np.float64) for i in range(3))
    return ((0.299 * r + 0.587 * g + 0.114 * b) / 255.0).reshape(-1, 1, 32, 32)


@pytest.fixture
def cifar10_root(tmp_path):
    """Five training batches of 3 images and a test batch of 4, in the exact python-pickle format."""
    rng = np.random.default_rng(0)
    folder = tmp_path / CIFAR10_FOLDER
    folder.mkdir()
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, 3)],
            b"data": _rows(rng, 3),
            b"filenames": [b"x.png"] * 3,
        }
    batches["test_batch"] = {b"labels": [0, 9, 3, 1], b"data": _rows(rng, 4)}
    for name, payload in batches.items():
        _write(folder / name, payload)
    return tmp_path, batches


def test_cifar10_round_trip(cifar10_root):
    root, batches = cifar10_root
    data = load_cifar10(root)
    train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    assert data.train_x.shape == (15, 1, 32, 32) and data.train_x.dtype == np.float32
    assert data.test_x.shape == (4, 1, 32, 32) and data.n_classes == 10
    np.testing.assert_allclose(data.train_x, _expected_gray(train_rows), atol=1e-6)
    np.testing.assert_allclose(data.test_x, _expected_gray(batches["test_batch"][b"data"]), atol=1e-6)
    np.testing.assert_array_equal(data.train_y, train_labels)
    np.testing.assert_array_equal(data.test_y, [0, 9, 3, 1])
    assert data.train_y.dtype == np.int64
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    # The folder itself is accepted as well as its parent, and load_dataset dispatches by name.
    assert dataset_checksum(load_cifar10(root / CIFAR10_FOLDER)) == dataset_checksum(data)
    assert dataset_checksum(load_dataset("cifar10", root)) == dataset_checksum(data)


def test_luma_is_itu_601():
    """A pure red, green and blue pixel map to 0.299, 0.587 and 0.114: channel order R|G|B is respected."""
    from neureg.models.vision.datasets import rgb_rows_to_gray

    rows = np.zeros((3, 3072), dtype=np.uint8)
    for channel in range(3):
        rows[channel, channel * 1024 : (channel + 1) * 1024] = 255
    gray = rgb_rows_to_gray(rows)
    np.testing.assert_allclose(gray[:, 0, 5, 7], [0.299, 0.587, 0.114], atol=1e-6)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / CIFAR100_FOLDER
    folder.mkdir()
    train = {b"data": _rows(rng, 5), b"fine_labels": [0, 99, 5, 7, 50], b"coarse_labels": [0, 19, 1, 2, 3]}
    test = {b"data": _rows(rng, 2), b"fine_labels": [42, 3], b"coarse_labels": [4, 5]}
    _write(folder / "train", train)
    _write(folder / "test", test)
    data = load_cifar100(tmp_path)
    assert data.n_classes == 100 and data.name == "cifar100"
    np.testing.assert_array_equal(data.train_y, [0, 99, 5, 7, 50])
    np.testing.assert_allclose(data.test_x, _expected_gray(test[b"data"]), atol=1e-6)


def test_missing_root_and_folder_are_named(tmp_path):
    with pytest.raises(DatasetError, match="root="):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match=str(tmp_path / CIFAR10_FOLDER)):
        load_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def test_missing_batch_file_is_named(cifar10_root):
    root, _ = cifar10_root
    (root / CIFAR10_FOLDER / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing.*data_batch_3"):
        load_cifar10(root)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a pickle at all", "unreadable"),
        ({b"pixels": np.zeros((3, 3072), np.uint8), b"labels": [0, 0, 0]}, "lacks keys"),
        ({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 0, 0]}, r"uint8 \(N, 3072\)"),
        ({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 0, 0]}, "an array of float32"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 0, 0], b"x": {1.5}}, "a value of type set"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 0]}, "3 integer labels"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 0, 10]}, "outside"),
    ],
)
def test_corrupt_batch_is_named(cifar10_root, payload, message):
    root, _ = cifar10_root
    path = root / CIFAR10_FOLDER / "data_batch_2"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        _write(path, payload)
    with pytest.raises(DatasetError, match=message) as info:
        load_cifar10(root)
    assert str(root / CIFAR10_FOLDER) in str(info.value)


def test_truncated_pickle_is_named(cifar10_root):
    root, _ = cifar10_root
    path = root / CIFAR10_FOLDER / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="unreadable.*test_batch"):
        load_cifar10(root)


def test_mnist_demo_split():
    data = load_mnist_demo()
    assert data.train_x.shape == (4000, 1, 32, 32) and data.test_x.shape == (1000, 1, 32, 32)
    assert data.train_x.dtype == np.float32 and data.n_classes == 10
    assert np.bincount(data.test_y).tolist() == [100] * 10
    assert np.bincount(data.train_y).tolist() == [400] * 10
    # Padded 28 -> 32 with a 2-px zero border; digits reach full ink.
    assert data.train_x[:, :, :2].max() == 0 and data.train_x[:, :, :, -2:].max() == 0
    assert data.train_x.max() == pytest.approx(1.0)
    # Train and test share no image; the split is fixed.
    train_keys = {row.tobytes() for row in data.train_x.reshape(4000, -1)}
    assert not any(row.tobytes() in train_keys for row in data.test_x.reshape(1000, -1))
    assert dataset_checksum(load_dataset("mnist_demo")) == dataset_checksum(data)


def test_checksum_tracks_content_not_name():
    rng = np.random.default_rng(2)
    x = rng.random((4, 1, 32, 32), dtype=np.float32)
    y = np.arange(4, dtype=np.int64)
    base = ClassificationData("a", x, y, x[:2], y[:2], 10)
    assert dataset_checksum(base) == dataset_checksum(ClassificationData("b", x.copy(), y, x[:2], y[:2], 10))
    changed = x.copy()
    changed[1, 0, 3, 3] += 1e-3
    assert dataset_checksum(ClassificationData("a", changed, y, x[:2], y[:2], 10)) != dataset_checksum(base)
    assert dataset_checksum(ClassificationData("a", x, y, x[:2], y[:2], 100)) != dataset_checksum(base)
    # The same bytes split differently between train and test are a different dataset.
    assert dataset_checksum(ClassificationData("a", x[:3], y[:3], x[3:], y[3:], 10)) != dataset_checksum(
        ClassificationData("a", x[:2], y[:2], x[2:], y[2:], 10)
    )
