"""Readers on small files written in the real formats, and the embedded datasets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from sgdgeom.data import (
    augmentation,
    batches,
    load_dataset,
    read_cifar10_batch,
    read_idx,
    read_stl10_images,
    read_stl10_labels,
)
from sgdgeom.errors import DatasetError


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    code = {np.uint8: 0x08, np.int8: 0x09, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if compress else "a")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_truncated_names_file_and_format(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError, match=r"truncated .*train-images-idx3-ubyte.*implies"):
        read_idx(path)


def test_read_idx_bad_magic_and_bad_gzip(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="bad IDX magic"):
        read_idx(bad)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20)[:-10])
    with pytest.raises(DatasetError, match="corrupt gzip file .*bad.gz"):
        read_idx(gz)
    with pytest.raises(DatasetError, match="missing file"):
        read_idx(tmp_path / "nope")


def make_mnist_root(root, name="mnist", n=(6, 4), compress=True):
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "t10k"), n, strict=True):
        suffix = ".gz" if compress else ""
        write_idx(
            folder / f"{split}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (count, 28, 28)).astype(np.uint8),
            compress,
        )
        write_idx(
            folder / f"{split}-labels-idx1-ubyte{suffix}",
            (np.arange(count) % 10).astype(np.uint8),
            compress,
        )
    return folder


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_dataset_from_root(tmp_path, name):
    make_mnist_root(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5]


def test_missing_root_and_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="pass --data-root"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", tmp_path / "absent")
    with pytest.raises(DatasetError, match="no mnist directory"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    labels = list(rng.integers(0, 10, n))
    with open(path, "wb") as handle:
        pickle.dump(
            {b"batch_label": b"x", b"data": data, b"labels": [int(v) for v in labels]},
            handle,
            protocol=2,
        )
    return data, labels


def test_cifar10_reader_and_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data, labels = write_cifar_batch(folder / "test_batch", 3, 0)
    images, read_labels = read_cifar10_batch(folder / "test_batch")
    np.testing.assert_array_equal(images, data.reshape(3, 3, 32, 32))
    assert read_labels.tolist() == labels
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 2, i)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.mean.shape == (3, 1, 1)


def test_cifar10_rejects_corrupt_and_foreign_pickles(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="corrupt file .*data_batch_1.*CIFAR-10"):
        read_cifar10_batch(path)
    # A pickle that would call a function is refused, not executed.
    path.write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(DatasetError, match="not allowed"):
        read_cifar10_batch(path)


def test_stl10_binary_is_column_major(tmp_path):
    image = np.arange(3 * 96 * 96, dtype=np.int64).reshape(3, 96, 96) % 256
    image = image.astype(np.uint8)
    # The file stores each channel column-major, i.e. the transpose in C order.
    (tmp_path / "x.bin").write_bytes(np.ascontiguousarray(image.transpose(0, 2, 1)).tobytes())
    np.testing.assert_array_equal(read_stl10_images(tmp_path / "x.bin")[0], image)
    (tmp_path / "y.bin").write_bytes(bytes([1, 10, 3]))
    assert read_stl10_labels(tmp_path / "y.bin").tolist() == [0, 9, 2]


def test_stl10_truncated_and_bad_labels(tmp_path):
    (tmp_path / "train_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DatasetError, match="truncated .*train_X.bin.*27648"):
        read_stl10_images(tmp_path / "train_X.bin")
    (tmp_path / "train_y.bin").write_bytes(bytes([0, 11]))
    with pytest.raises(DatasetError, match="labels outside 1..10"):
        read_stl10_labels(tmp_path / "train_y.bin")


def test_stl10_loader(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", 2), ("test", 1)):
        (folder / f"{split}_X.bin").write_bytes(bytes(n * 3 * 96 * 96))
        (folder / f"{split}_y.bin").write_bytes(bytes([1] * n))
    ds = load_dataset("stl10", tmp_path)
    assert ds.x_train.shape == (2, 3, 96, 96) and ds.y_test.tolist() == [0]


@pytest.mark.parametrize(
    ("name", "shape", "n"),
    [("digits", (1, 8, 8), 1797), ("mnist5k", (1, 28, 28), 5000), ("mnist1d", (40,), 5000)],
)
def test_embedded_datasets(name, shape, n):
    ds = load_dataset(name)
    assert ds.input_shape == shape
    assert len(ds.y_train) + len(ds.y_test) == n
    assert ds.num_classes == 10
    assert set(ds.y_test.tolist()) == set(range(10))
    normalized = ds.normalize(ds.x_train)
    assert abs(normalized.mean().item()) < 1e-3
    assert abs(normalized.std().item() - 1) < 1e-2


def test_embedded_split_is_deterministic():
    from sgdgeom.data import _load_digits

    first, second = _load_digits(None), _load_digits(None)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batches_cover_every_sample_once():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    got = torch.cat([b for _, b in batches(x, y, 3, generator=torch.Generator().manual_seed(1))])
    assert sorted(got.tolist()) == list(range(10))
    assert [len(b) for _, b in batches(x, y, 3, drop_last=True)] == [3, 3, 3]


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cifar10-crop", (4, 3, 32, 32)),
        ("mnist-crop", (4, 1, 28, 28)),
        ("stl10-heavy", (2, 3, 96, 96)),
    ],
)
def test_augmentations_keep_shape_and_range(name, shape):
    torch.manual_seed(0)
    x = torch.rand(shape)
    out = augmentation(name)(x)
    assert out.shape == shape
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5
    assert not torch.allclose(out, x)
    with pytest.raises(DatasetError, match="unknown augmentation"):
        augmentation("mixup")


def test_a_dataset_installed_in_a_system_folder_is_found_without_flags(tmp_path):
    system = tmp_path / "system"
    make_mnist_root(system, name="fashion-mnist")
    env = {**os.environ, "SGDGEOM_SYSTEM_DATASETS": str(system)}
    code = (
        "from sgdgeom.data import load_dataset; "
        "d = load_dataset('fashion-mnist'); print(tuple(d.x_train.shape))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert found.stdout.strip() == "(6, 1, 28, 28)"
    listing = subprocess.run(
        [sys.executable, "-m", "sgdgeom", "datasets"], capture_output=True, text=True, env=env
    )
    assert "fashion-mnist  yes" in listing.stdout and f"found in {system}" in listing.stdout
    given = tmp_path / "given"
    make_mnist_root(given, name="fashion-mnist", n=(3, 2))  # --data-root comes first
    code = code.replace(
        "load_dataset('fashion-mnist')", f"load_dataset('fashion-mnist', {str(given)!r})"
    )
    first = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert first.stdout.strip() == "(3, 1, 28, 28)"
