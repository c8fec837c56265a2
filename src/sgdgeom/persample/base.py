r"""The products protocol: what every route computes with the per-sample gradient matrix G.

Notation (``docs/design.md``): per-sample losses :math:`f_i(x)`, :math:`i = 1..N`, per-sample
gradients :math:`g_i = \nabla f_i \in \mathbb{R}^d`, stacked as the rows of
:math:`G \in \mathbb{R}^{N \times d}`. :math:`G` is never stored by the capture route;
everything is a product:

- ``jvp(v)``: :math:`c = G v`, shape ``(N,)``;
- ``vjp(w)``: :math:`G^\top w = \sum_i w_i g_i`, shape ``(d,)``;
- ``jvp_batch(V)`` and ``vjp_batch(W)``: the same for ``m`` vectors at once, ``(d, m) ->
  (N, m)`` and ``(N, m) -> (d, m)``, in one pass over the data (block eigensolvers);
- ``gram()``: the raw Gram matrix :math:`G G^\top`, shape ``(N, N)``;
- ``sq_norms()``: :math:`\|g_{i,p}\|^2` per sample and parameter tensor, ``(N, P)``;
- ``square_sum()``: :math:`\sum_i g_i \odot g_i`, ``(d,)`` (the diagonal of ``Gᵀ G``);
- ``per_sample_grads()``: chunks of rows of :math:`G` (dense references, small d);
- ``losses()``: the :math:`f_i`, ``(N,)``;
- second-order products, for the geometry of Fioresi et al. (F7, F8): ``second_directional``
  (:math:`v^\top H_i v`), ``hessian_vector`` (:math:`\sum_i w_i H_i v`) and
  ``third_directional`` (:math:`\sum_i w_i \nabla(v^\top H_i v)`) and
  ``gradient_norm_gradient`` (:math:`\sum_i w_i H_i g_i`). Only routes that hold the
  loss as a function of the parameters (:class:`~sgdgeom.persample.func.FuncProducts`)
  provide them; the others raise :class:`~sgdgeom.errors.UnsupportedModelError`.

:class:`PerSampleProducts` is a :class:`typing.Protocol`; a route subclasses it to inherit
the defaults, which materialise chunks of ``G``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.params import ParamSpace

__all__ = ["PerSampleProducts"]


@runtime_checkable
class PerSampleProducts(Protocol):
    """Products with the per-sample gradient matrix ``G`` (``N x d``) of one dataset.

    Attributes:
        space: the parameter space (``d = space.dim``).
        n: ``N``, the number of samples.
    """

    space: ParamSpace
    n: int

    def jvp(self, v: Tensor) -> Tensor:
        """``G v`` for a flat ``(d,)`` vector: the ``(N,)`` directional derivatives."""
        ...

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """``Gᵀ w = Σ_i w_i g_i`` for ``w`` of shape ``(N,)``: a flat ``(d,)`` vector, written
        into ``out`` if given (a buffer kept across calls saves allocating ``d`` floats)."""
        ...

    def jvp_batch(self, V: Tensor) -> Tensor:
        """``G V`` for ``m`` vectors, ``(d, m) -> (N, m)``. The default takes one
        :meth:`jvp` per column; a route that can do it in one pass over the data overrides it."""
        return torch.stack([self.jvp(column.contiguous()) for column in V.T], 1)

    def vjp_batch(self, W: Tensor) -> Tensor:
        """``Gᵀ W`` for ``m`` weight vectors, ``(N, m) -> (d, m)`` (default: a :meth:`vjp` per
        column)."""
        return torch.stack([self.vjp(column.contiguous()) for column in W.T], 1)

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, G[start:start+b])`` chunks of rows of ``G``, shape ``(b, d)``."""
        ...

    def losses(self) -> Tensor:
        """The per-sample losses ``(N,)``."""
        ...

    def gram(self) -> Tensor:
        """The raw Gram matrix ``G Gᵀ``, ``(N, N)``, from pairs of materialised chunks."""
        out = torch.zeros(self.n, self.n, dtype=self.space.dtype, device=self.space.device)
        for i, rows_i in self.per_sample_grads():
            for j, rows_j in self.per_sample_grads():
                if j >= i:
                    block = rows_i @ rows_j.T
                    out[i : i + len(rows_i), j : j + len(rows_j)] = block
                    out[j : j + len(rows_j), i : i + len(rows_i)] = block.T
        return out

    def costs(self) -> tuple[float, float]:
        """Multiply-adds of one :meth:`jvp` (a :meth:`vjp` costs the same) and of the raw
        :meth:`gram`: what a caller weighs to choose between products and the Gram matrix
        (``N d`` and ``N² d`` for materialised rows, the default)."""
        n, d = float(self.n), float(self.space.dim)
        return n * d, n * n * d

    def sq_norms(self) -> Tensor:
        """``‖g_{i,p}‖²`` for every sample i and parameter tensor p: ``(N, P)``."""
        out = torch.zeros(
            self.n, len(self.space.names), dtype=self.space.dtype, device=self.space.device
        )
        for start, rows in self.per_sample_grads():
            sq = rows.square()
            for p, (a, b) in enumerate(
                zip(self.space.offsets[:-1], self.space.offsets[1:], strict=True)
            ):
                out[start : start + len(rows), p] = sq[:, a:b].sum(1)
        return out

    def square_sum(self) -> Tensor:
        """``Σ_i g_i ⊙ g_i``, ``(d,)``: the diagonal of ``Gᵀ G``, from materialised chunks."""
        out = torch.zeros(self.space.dim, dtype=self.space.dtype, device=self.space.device)
        for _, rows in self.per_sample_grads():
            out += rows.square().sum(0)
        return out

    def second_directional(self, v: Tensor) -> Tensor:
        """``vᵀ H_i v`` for every sample: ``(N,)``."""
        raise _no_second_order(self)

    def hessian_vector(self, v: Tensor, weights: Tensor) -> Tensor:
        """``Σ_i w_i H_i v``: ``(d,)`` (the mean Hessian's product with ``w_i = 1/N``)."""
        raise _no_second_order(self)

    def third_directional(self, v: Tensor, weights: Tensor) -> Tensor:
        """``Σ_i w_i ∇_x (vᵀ H_i(x) v)``: ``(d,)``, the third-derivative tensors contracted
        twice with ``v``."""
        raise _no_second_order(self)

    def gradient_norm_gradient(self, weights: Tensor) -> Tensor:
        """``Σ_i w_i ∇_x (½‖g_i(x)‖²) = Σ_i w_i H_i g_i``: ``(d,)``, each sample's Hessian
        applied to its own gradient."""
        raise _no_second_order(self)


def _no_second_order(products: object) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(products).__name__} has no second derivatives of the per-sample losses; "
        f"build the diffusion matrix with route='generic'"
    )
