"""The data source of the per-sample products: one batch, or a loader streamed in chunks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sgdgeom.errors import InputError, SgdgeomError

__all__ = ["DataSource"]


class DataSource:
    """Chunks of one dataset: a batch ``(x, y)`` or any iterable of batches (a DataLoader).

    Iterating yields ``(start, x, y)``, where ``start`` is the index of the chunk's first
    sample. A loader is streamed on every pass and must yield the same data each time
    (``shuffle=False``); that is checked on every pass.
    """

    def __init__(
        self, data: Any, chunk_size: int | None = None, device: torch.device | None = None
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = device
        self.chunk_size = chunk_size
        self._batch: tuple[Tensor, Tensor] | None = None
        self._loader: Iterable[Any] | None = None
        if (
            isinstance(data, tuple | list)
            and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
        ):
            x, y = data
            if len(x) != len(y) or len(x) == 0:
                raise InputError(
                    f"x and y must hold the same number (>0) of samples, got {len(x)} and {len(y)}"
                )
            self._batch = (x, y)
            self.n = len(x)
        elif isinstance(data, Iterable):
            self._loader = data
            self._fingerprint: list[tuple[int, float]] | None = None
            for _ in self._iter_loader(None):  # one pass counts the samples
                pass
            self.n = self._n_seen
            if self.n == 0:
                raise InputError("the data loader yielded no samples")
        else:
            raise TypeError(
                f"data must be a batch (x, y) or an iterable of batches, got {type(data).__name__}"
            )

    def _iter_loader(self, progress: tqdm | None) -> Iterator[tuple[int, Tensor, Tensor]]:
        start, fingerprint = 0, []
        for batch in self._loader or ():
            x, y = batch[0], batch[1]
            fingerprint.append((len(x), float(x.double().sum()) + float(y.double().sum())))
            for offset, xc, yc in self._split(x, y):
                yield start + offset, xc, yc
            start += len(x)
            if progress is not None:
                progress.update(len(x))
        if self._fingerprint is None:
            self._fingerprint, self._n_seen = fingerprint, start
        elif fingerprint != self._fingerprint:
            raise SgdgeomError(
                "the data loader yielded different data on another pass; per-sample products "
                "need a fixed dataset: use shuffle=False and no random augmentation"
            )

    def _split(self, x: Tensor, y: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        size = self.chunk_size or len(x)
        for start in range(0, len(x), size):
            yield start, self._to(x[start : start + size]), self._to(y[start : start + size])

    def _to(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.device is not None else t

    def chunks(
        self, progress: bool = False, desc: str = ""
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, x, y)`` chunks covering the dataset once, in order."""
        with tqdm(total=self.n, disable=not progress, desc=desc, unit="sample", leave=False) as bar:
            if self._batch is not None:
                for start, x, y in self._split(*self._batch):
                    yield start, x, y
                    bar.update(len(x))
            else:
                yield from self._iter_loader(bar)

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        return self.chunks()
