"""Materialised rows: products with an explicit ``G`` (``N x d``) already in memory.

The dense route: the optimizer's closure route (a closure gives the per-sample losses of one
minibatch, ``N = B``, so ``B x d`` is affordable where ``N x d`` of a dataset is not), the RBM's
CD gradients, and the tests' references.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from sgdgeom.errors import InputError
from sgdgeom.params import ParamSpace
from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.losses import check_graph_independent

__all__ = ["RowProducts"]


class RowProducts(PerSampleProducts):
    """Products with an explicit ``G`` (``N x d``) already in memory: the optimizer's closure
    route (parameters without the model, or tied weights), whose closure gives the per-sample
    losses of one minibatch (``N = B``, so ``B x d`` is affordable where ``N x d`` of a dataset
    is not)."""

    def __init__(self, space: ParamSpace, rows: Tensor, losses: Tensor | None = None) -> None:
        if rows.dim() != 2 or rows.shape[1] != space.dim:
            raise InputError(f"rows must be (N, {space.dim}), got {tuple(rows.shape)}")
        self.space, self.rows, self.n = space, rows, len(rows)
        self._losses = losses

    @classmethod
    def from_losses(
        cls, space: ParamSpace, params: Sequence[Tensor], losses: Tensor
    ) -> RowProducts:
        """Per-sample gradients of a ``(B,)`` loss vector with its autograd graph: one
        batched backward (``is_grads_batched``)."""
        if losses.dim() != 1:
            raise InputError(
                f"the closure must return per-sample losses (B,), got shape {tuple(losses.shape)}"
            )
        check_graph_independent(losses)
        eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, list(params), eye, is_grads_batched=True, allow_unused=True
        )
        rows = torch.cat(
            [
                (
                    g
                    if g is not None
                    else torch.zeros(
                        len(losses), p.numel(), dtype=losses.dtype, device=losses.device
                    )
                ).reshape(len(losses), -1)
                for g, p in zip(grads, params, strict=True)
            ],
            1,
        )
        return cls(space, rows, losses.detach())

    def jvp(self, v: Tensor) -> Tensor:
        return self.rows @ v

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.mv(self.rows.T, w, out=out) if out is not None else self.rows.T @ w

    def jvp_batch(self, V: Tensor) -> Tensor:
        return self.rows @ V

    def vjp_batch(self, W: Tensor) -> Tensor:
        return self.rows.T @ W

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        yield 0, self.rows

    def losses(self) -> Tensor:
        if self._losses is None:
            raise InputError("these products were built without the losses")
        return self._losses

    def gram(self) -> Tensor:
        return self.rows @ self.rows.T

    def square_sum(self) -> Tensor:
        return self.rows.square().sum(0)
