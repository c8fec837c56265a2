"""Where the captures of a data set live: in memory, in memory-mapped files, or nowhere.

The capture route keeps, per chunk of samples, what each layer saw (its inputs) and the
gradients at its outputs: ``O(N x widths)`` numbers, never ``N x d``. When they fit in
memory they are kept there; when they do not, :class:`DiskChunks` writes each chunk once
to raw ``.npy`` files in a private folder under a cache directory, and every later pass
reads them back through ``numpy.memmap`` instead of running the network again. Nothing is
pickled: each file holds one tensor's bytes, and the structure of the calls (dataclasses,
dicts, lists) stays in memory. The folder is removed when the products are garbage
collected.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from sgdgeom._deprecated import renamed
from sgdgeom.errors import InputError
from sgdgeom.memory import available_bytes

__all__ = [
    "CacheMode",
    "DiskChunks",
    "available_bytes",
    "cache_mode",
    "check_disk",
    "map_tensors",
    "nbytes",
]

CacheMode = Literal["auto", "memory", "disk", "off"]
"""Where the captures live: chosen by size (``"auto"``), in memory, in memory-mapped files,
or nowhere (``"off"``: captured again on every pass)."""


def cache_mode(cache: object) -> CacheMode:
    """The cache option in its current spelling (``True``/``False`` were ``"memory"``/``"off"``)."""
    value = renamed("cache", cache, {True: "memory", False: "off"})
    if value not in get_args(CacheMode):
        raise InputError(f"cache must be one of {', '.join(get_args(CacheMode))}, got {cache!r}")
    mode: CacheMode = value
    return mode


def map_tensors(obj: Any, function: Callable[[Any], Any], leaf: type = Tensor) -> Any:
    """``obj`` with every tensor (every instance of ``leaf``) inside dataclasses, dicts,
    lists and tuples replaced by ``function(tensor)``; other leaves are kept as they are."""
    if isinstance(obj, leaf):
        return function(obj)
    if _rebuildable(obj):
        changes = {
            f.name: map_tensors(getattr(obj, f.name), function, leaf)
            for f in dataclasses.fields(obj)
        }
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {key: map_tensors(value, function, leaf) for key, value in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(value, function, leaf) for value in obj]
    if isinstance(obj, tuple):
        items = [map_tensors(value, function, leaf) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _rebuildable(obj: Any) -> bool:
    """A dataclass instance that :func:`dataclasses.replace` can rebuild (every field an
    ``__init__`` argument); others (a pytree ``TreeSpec``) are leaves."""
    return (
        dataclasses.is_dataclass(obj)
        and not isinstance(obj, type)
        and all(f.init for f in dataclasses.fields(obj))
    )


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors inside ``obj`` (see :func:`map_tensors`)."""
    sizes: list[int] = []
    map_tensors(obj, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def check_disk(folder: Path, needed: int) -> None:
    """Refuse, before writing, captures that the disk under ``folder`` (or its nearest
    existing parent, if it is still to be made) cannot hold."""
    folder = folder.expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise InputError(
            f"the captures need about {needed / 2**30:.1f} GiB and {folder} has "
            f"{free / 2**30:.1f} GiB free: pass another cache_dir, fewer samples, or "
            f"cache=False (recompute the captures on every pass)"
        )


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A tensor written to ``path`` as raw bytes."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device


OWNER = "owner"
"""The file in a captures folder that names the process that made it (pid, start time)."""


def _process_identity(pid: int) -> str | None:
    """``"pid start-time"`` of a live process (the start time tells a reused pid apart),
    or None where it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{pid} {fields[19]}"  # field 22 of stat: the start time
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (OSError, ProcessLookupError):
            return None
        return f"{pid} ?"


def reclaim_stale_captures(root: Path) -> list[Path]:
    """Remove the ``captures-*`` folders under ``root`` whose owner process is gone (a run
    killed with SIGKILL cannot remove its own); returns them. A folder whose owner is
    alive, or that names no owner, is left."""
    removed = []
    for folder in root.glob("captures-*"):
        try:
            owner = (folder / OWNER).read_text().split()
            pid = int(owner[0])
        except (OSError, ValueError, IndexError):
            continue
        if folder.is_symlink() or not folder.is_dir():
            continue
        alive = _process_identity(pid)
        if alive is None or (owner[1:] and alive.split()[1] not in (owner[1], "?")):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class DiskChunks:
    """Chunks of captures in memory-mapped files under ``cache_dir`` (one private folder
    per instance). :meth:`add` writes a chunk; iterating reads every chunk back, its
    tensors mapped from disk (and moved to their device)."""

    def __init__(self, cache_dir: str | Path) -> None:
        root = Path(cache_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        reclaim_stale_captures(root)
        self.folder = Path(tempfile.mkdtemp(prefix="captures-", dir=root))
        (self.folder / OWNER).write_text(_process_identity(os.getpid()) or "")
        self._skeletons: list[Any] = []
        self._count = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def _write(self, tensor: Tensor) -> _Stored:
        path = self.folder / f"{self._count:08d}.npy"
        self._count += 1
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        np.save(path, raw, allow_pickle=False)
        return _Stored(path, tensor.dtype, tuple(tensor.shape), tensor.device)

    @staticmethod
    def _read(stored: _Stored) -> Tensor:
        mapped = np.load(stored.path, mmap_mode="c", allow_pickle=False)  # copy-on-write
        tensor = torch.from_numpy(mapped).view(stored.dtype).reshape(stored.shape)
        return tensor.to(stored.device)

    def add(self, chunk: Any) -> None:
        self._skeletons.append(map_tensors(chunk, self._write))

    def __iter__(self) -> Iterator[Any]:
        for skeleton in self._skeletons:
            yield map_tensors(skeleton, self._read, _Stored)

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir())
