"""Datasets, read from files the user has (nothing is downloaded), and label noise.

* ``digits``: scikit-learn's handwritten digits (ships inside scikit-learn),
  8x8 grayscale, a fixed stratified 75/25 train/test split.
* ``cifar10`` / ``cifar100``: the official *binary* archives
  (``cifar-10-batches-bin/``, ``cifar-100-binary/``); never unpickled.
* ``fashion_mnist``: the four official idx ``.gz`` files.
* any of the three from TensorFlow Datasets, when it is installed and the
  dataset was prepared beforehand (``download=False``).

Images come back as ``uint8`` ``(N, H, W, C)`` arrays (digits as ``float32``
in [0, 1]) with ``int32`` labels; normalization (``trainer.normalizer``) runs on device.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam_optax.program.configs import DATASETS
from sam_optax.program.errors import DataError
from sam_optax.program.errors import UsageError

_SOURCES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
}

# Per-channel mean and std of the training images (0-255 scale).
_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    "fashion_mnist": ((72.9,), (90.0,)),
    "digits": ((0.0,), (1.0,)),
}


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _STATS[self.name]


def default_data_dir() -> Path:
    return Path(os.environ.get("SAM_OPTAX_DATA", Path.home() / ".cache" / "sam_optax"))


def load(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a dataset by name (see the module docstring for the sources)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}.")
    if name == "digits":
        return _digits()
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        if name == "cifar10":
            return _cifar10(root)
        if name == "cifar100":
            return _cifar100(root)
        return _fashion_mnist(root)
    except FileNotFoundError as missing:
        tfds_data = _from_tfds(name, root)
        if tfds_data is not None:
            return tfds_data
        raise DataError(
            f"{missing} Download it from {_SOURCES[name]} and extract it under "
            f"--data-dir (now {root}); sam-optax never downloads anything."
        ) from None


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------
# CIFAR binary archives
# --------------------------------------------------------------------------


def _find(root: Path, folder: str, filename: str) -> Path:
    candidates = [root / folder / filename, root / filename]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{filename} not found; looked for {' and '.join(str(c) for c in candidates)}."
    )


def read_cifar_binary(
    path: Path, label_bytes: int, label_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR binary file: records of label byte(s) + 3072 pixel bytes (R, G, B planes)."""
    record = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path} is truncated or not a CIFAR binary file: {raw.size} bytes is not a "
            f"positive multiple of the {record}-byte record."
        )
    raw = raw.reshape(-1, record)
    labels = raw[:, label_index].astype(np.int32)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.max(initial=0) >= num_classes:
        raise DataError(f"{path} holds label {labels.max()} >= {num_classes}: corrupt file.")


def _cifar10(root: Path) -> Dataset:
    folder = "cifar-10-batches-bin"
    parts = []
    for i in range(1, 6):
        path = _find(root, folder, f"data_batch_{i}.bin")
        parts.append(read_cifar_binary(path, 1, 0))
        _check_labels(path, parts[-1][1], 10)
    test_path = _find(root, folder, "test_batch.bin")
    x_te, y_te = read_cifar_binary(test_path, 1, 0)
    _check_labels(test_path, y_te, 10)
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, 10)


def _cifar100(root: Path) -> Dataset:
    folder = "cifar-100-binary"
    train_path = _find(root, folder, "train.bin")
    test_path = _find(root, folder, "test.bin")
    x_tr, y_tr = read_cifar_binary(train_path, 2, 1)  # (coarse, fine): the fine label
    x_te, y_te = read_cifar_binary(test_path, 2, 1)
    _check_labels(train_path, y_tr, 100)
    _check_labels(test_path, y_te, 100)
    return Dataset("cifar100", x_tr, y_tr, x_te, y_te, 100)


# --------------------------------------------------------------------------
# Fashion-MNIST idx.gz
# --------------------------------------------------------------------------


def read_idx_gz(path: Path, expected_ndim: int) -> np.ndarray:
    """Reads an idx file (big-endian header: 0, 0, dtype 0x08 = uint8, ndim; dims)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable gzip file ({err}).") from None
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes.")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim != expected_ndim:
        raise DataError(
            f"{path} is not an idx uint8 file with {expected_ndim} dimension(s) "
            f"(header {data[:4].hex()})."
        )
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise DataError(
            f"{path} is truncated or corrupt: dims {dims} need {header + size} bytes, got {len(data)}."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _fashion_mnist(root: Path) -> Dataset:
    folder = "fashion_mnist"

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        img_path = _find(root, folder, f"{prefix}-images-idx3-ubyte.gz")
        lbl_path = _find(root, folder, f"{prefix}-labels-idx1-ubyte.gz")
        images = read_idx_gz(img_path, 3)
        labels = read_idx_gz(lbl_path, 1).astype(np.int32)
        if len(images) != len(labels):
            raise DataError(
                f"{img_path} has {len(images)} images but {lbl_path} {len(labels)} labels."
            )
        _check_labels(lbl_path, labels, 10)
        return images[..., None], labels

    x_tr, y_tr = pair("train")
    x_te, y_te = pair("t10k")
    return Dataset("fashion_mnist", x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------
# TFDS (optional)
# --------------------------------------------------------------------------


def _from_tfds(name: str, root: Path) -> Dataset | None:
    """The dataset from TFDS if it is installed and already prepared, else None."""
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        splits = tfds.as_numpy(
            tfds.load(
                name,
                split=["train", "test"],
                batch_size=-1,
                data_dir=str(root),
                download=False,
            )
        )
    except Exception:
        return None
    (train, test) = splits
    classes = 100 if name == "cifar100" else 10
    return Dataset(
        name,
        np.asarray(train["image"], np.uint8),
        np.asarray(train["label"], np.int32),
        np.asarray(test["image"], np.uint8),
        np.asarray(test["label"], np.int32),
        classes,
    )


# --------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------


def symmetric_label_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flips ``round(rate * n)`` labels, chosen at random, each to a different class.

    Returns the noisy labels and the sorted flipped indices (to be recorded).
    The new class is uniform over the other ``num_classes - 1`` classes.
    """
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"label noise must be in [0, 1), got {rate}.")
    rng = np.random.default_rng([seed, 0x5A11])
    n = len(labels)
    flipped = np.sort(rng.choice(n, size=round(rate * n), replace=False))
    noisy = labels.copy()
    shift = rng.integers(1, num_classes, size=len(flipped))
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy.astype(np.int32), flipped
