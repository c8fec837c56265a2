r"""Products over a data set sharded across processes (``torch.distributed``).

Each process holds the products of its own shard of the samples, in rank order: rank r
has samples ``start_r .. start_r + N_r``. With the rows of G split the same way,

- ``G v`` is every shard's part, gathered: ``(N,)`` on every rank;
- ``Gᵀ w = Σ_r G_rᵀ w_r``: each rank multiplies its slice of ``w``, and the parts are
  all-reduced;
- the Gram matrix ``G Gᵀ`` is assembled by blocks: each rank in turn broadcasts its
  captures (or, off the capture route, its rows of G), every rank computes its block
  row against them, and the block rows are gathered. Memory per rank: its own captures,
  one other shard's, and the ``N x N`` result.

So a :class:`~sgdgeom.diffusion.DiffusionMatrix` built with ``distributed=True`` on each
process's shard has the spectrum, traces and products of the whole data set, identical on
every rank. Vectors must be identical across ranks (a seeded start block is).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.capture import CaptureProducts

__all__ = ["ShardedProducts"]


class ShardedProducts(PerSampleProducts):
    """The products of the union of every process's shard (module doc).

    Args:
        local: this process's products over its shard.
    """

    def __init__(self, local: PerSampleProducts) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError(
                "distributed=True needs an initialised torch.distributed process group"
            )
        self.local, self.space = local, local.space
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        count = torch.tensor([local.n], device=self.space.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        self.counts = [int(c) for c in counts]
        self.starts = [sum(self.counts[:r]) for r in range(self.world)]
        self.n = sum(self.counts)
        self._mine = slice(self.starts[self.rank], self.starts[self.rank] + local.n)

    def _gather(self, part: Tensor) -> Tensor:
        """Every rank's ``(N_r, ...)`` part, concatenated in rank order: ``(N, ...)``."""
        padded = part.new_zeros(max(self.counts), *part.shape[1:])
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, self.counts, strict=True)])

    @staticmethod
    def _sum(part: Tensor) -> Tensor:
        dist.all_reduce(part)
        return part

    def jvp(self, v: Tensor) -> Tensor:
        return self._gather(self.local.jvp(v))

    def jvp_batch(self, V: Tensor) -> Tensor:
        return self._gather(self.local.jvp_batch(V))

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        total = self._sum(self.local.vjp(w[self._mine].contiguous()))
        return out.copy_(total) if out is not None else total

    def vjp_batch(self, W: Tensor) -> Tensor:
        return self._sum(self.local.vjp_batch(W[self._mine].contiguous()))

    def losses(self) -> Tensor:
        return self._gather(self.local.losses())

    def sq_norms(self) -> Tensor:
        return self._gather(self.local.sq_norms())

    def square_sum(self) -> Tensor:
        return self._sum(self.local.square_sum())

    def _rows(self) -> Tensor:
        return torch.cat([rows for _, rows in self.local.per_sample_grads()])

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        """All ``N`` rows of G on every rank (dense references, small d)."""
        yield 0, self._gather(self._rows())

    def _payload(self) -> Any:
        """What this rank sends for the Gram matrix: its captures, else its rows of G."""
        if isinstance(self.local, CaptureProducts):
            return list(self.local._chunks())
        return self._rows()

    def _block_row(self, theirs: Any) -> Tensor:
        """``g_a · g_b`` for this rank's samples a and another shard's samples b."""
        if not isinstance(self.local, CaptureProducts):
            return self._rows() @ theirs.T
        rows = []
        for mine in self.local._chunks():
            rows.append(torch.cat([self.local.gram_block(mine, other) for other in theirs], 1))
        return torch.cat(rows)

    def gram(self) -> Tensor:
        """The ``(N, N)`` raw Gram matrix by blocks (module doc). The captures travel
        through ``broadcast_object_list`` (pickled between the processes of this run; no
        file is read)."""
        row = torch.empty(self.local.n, self.n, dtype=self.space.dtype, device=self.space.device)
        for source in range(self.world):
            box = [self._payload() if source == self.rank else None]
            dist.broadcast_object_list(box, src=source)
            start = self.starts[source]
            row[:, start : start + self.counts[source]] = self._block_row(box[0])
        return self._gather(row)

    def _refuse(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            "second derivatives are not computed across processes; build D on one process "
            "for divergence() and the geometry of Fioresi et al."
        )

    def second_directional(self, v: Tensor) -> Tensor:
        raise self._refuse()

    def hessian_vector(self, v: Tensor, weights: Tensor) -> Tensor:
        raise self._refuse()

    def third_directional(self, v: Tensor, weights: Tensor) -> Tensor:
        raise self._refuse()

    def gradient_norm_gradient(self, weights: Tensor) -> Tensor:
        raise self._refuse()
