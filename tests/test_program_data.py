"""Dataset loaders on small files written in the official formats, and label noise."""

import gzip
import struct

import numpy as np
import pytest

from sam_optax.program import input_pipeline as ip
from sam_optax.program.errors import DataError


def _cifar_records(n, label_bytes, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10 if label_bytes == 1 else 100, size=(n, label_bytes), dtype=np.uint8)
    # The official layout: label byte(s), then the R plane, G plane, B plane (row-major).
    planes = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    return images, labels, np.concatenate([labels, planes], axis=1).tobytes()


def _write_cifar10(root, n=7):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    expected = []
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        images, labels, raw = _cifar_records(n, 1, i)
        (folder / name).write_bytes(raw)
        expected.append((images, labels[:, 0]))
    return folder, expected


def test_cifar10_binary(tmp_path):
    _, expected = _write_cifar10(tmp_path)
    data = ip.load("cifar10", tmp_path)
    np.testing.assert_array_equal(data.x_train, np.concatenate([e[0] for e in expected[:5]]))
    np.testing.assert_array_equal(data.y_train, np.concatenate([e[1] for e in expected[:5]]))
    np.testing.assert_array_equal(data.x_test, expected[5][0])
    np.testing.assert_array_equal(data.y_test, expected[5][1])
    assert data.x_train.shape == (35, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.num_classes == 10


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    out = {}
    for i, name in enumerate(["train.bin", "test.bin"]):
        images, labels, raw = _cifar_records(5, 2, 10 + i)
        (folder / name).write_bytes(raw)
        out[name] = (images, labels[:, 1])
    data = ip.load("cifar100", tmp_path)
    np.testing.assert_array_equal(data.x_train, out["train.bin"][0])
    np.testing.assert_array_equal(data.y_train, out["train.bin"][1])
    np.testing.assert_array_equal(data.y_test, out["test.bin"][1])
    assert data.num_classes == 100


def test_truncated_cifar_file_is_reported_by_name(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin is truncated"):
        ip.load("cifar10", tmp_path)


def test_missing_file_says_which_where_and_where_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        ip.load("cifar10", tmp_path)
    message = str(err.value)
    assert "data_batch_1.bin not found" in message
    assert str(tmp_path / "cifar-10-batches-bin") in message
    assert "cs.toronto.edu" in message and "never downloads" in message


def _idx(array, dtype_code=0x08):
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root, n_train=6, n_test=4):
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
        out[prefix] = (images, labels)
    return folder, out


def test_fashion_mnist_idx_gz(tmp_path):
    _, out = _write_fashion(tmp_path)
    data = ip.load("fashion_mnist", tmp_path)
    np.testing.assert_array_equal(data.x_train[..., 0], out["train"][0])
    np.testing.assert_array_equal(data.y_train, out["train"][1])
    np.testing.assert_array_equal(data.x_test[..., 0], out["t10k"][0])
    assert data.image_shape == (28, 28, 1)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: raw[: len(raw) // 2], "not a readable gzip file"),
        (lambda raw: gzip.compress(gzip.decompress(raw)[:-10]), "truncated or corrupt"),
        (
            lambda raw: gzip.compress(b"\x00\x00\x09\x03" + gzip.decompress(raw)[4:]),
            "not an idx uint8 file",
        ),
    ],
    ids=["cut-gzip", "short-payload", "bad-header"],
)
def test_corrupt_idx_file_is_reported_by_name(tmp_path, damage, match):
    folder, _ = _write_fashion(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte.gz.*{match}|{match}"):
        ip.load("fashion_mnist", tmp_path)


def test_digits_ship_with_scikit_learn():
    data = ip.load("digits")
    assert data.x_train.shape[1:] == (8, 8, 1)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="valid choices: digits, cifar10, cifar100, fashion_mnist"):
        ip.load("imagenet")


def test_tfds_is_used_when_files_are_missing(tmp_path, monkeypatch):
    # A stand-in for an installed TFDS with a prepared dataset: checks that the
    # adapter asks for it without downloading and converts what it returns.
    import sys
    import types

    calls = {}

    def load(name, split, batch_size, data_dir, download):
        calls.update(name=name, split=split, download=download, data_dir=data_dir)
        return "handle"

    def as_numpy(handle):
        assert handle == "handle"
        rng = np.random.default_rng(0)
        make = lambda n: {  # noqa: E731
            "image": rng.integers(0, 256, (n, 32, 32, 3)),
            "label": rng.integers(0, 10, n),
        }
        return [make(6), make(3)]

    monkeypatch.setitem(
        sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=as_numpy)
    )
    data = ip.load("cifar10", tmp_path)
    assert calls == {
        "name": "cifar10",
        "split": ["train", "test"],
        "download": False,
        "data_dir": str(tmp_path),
    }
    assert data.x_train.shape == (6, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.y_test.dtype == np.int32


def test_symmetric_label_noise_is_exact_seeded_and_recorded():
    labels = np.arange(1000) % 10
    noisy, flipped = ip.symmetric_label_noise(labels, 0.4, 10, seed=3)
    assert len(flipped) == 400 and len(set(flipped.tolist())) == 400
    assert np.all(noisy[flipped] != labels[flipped])
    keep = np.setdiff1d(np.arange(1000), flipped)
    np.testing.assert_array_equal(noisy[keep], labels[keep])
    again, flipped_again = ip.symmetric_label_noise(labels, 0.4, 10, seed=3)
    np.testing.assert_array_equal(again, noisy)
    np.testing.assert_array_equal(flipped_again, flipped)
    other, _ = ip.symmetric_label_noise(labels, 0.4, 10, seed=4)
    assert not np.array_equal(other, noisy)
    # every wrong class is reachable (symmetric noise)
    assert set(((noisy[flipped] - labels[flipped]) % 10).tolist()) == set(range(1, 10))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ip.symmetric_label_noise(labels, 1.0, 10, seed=0)
