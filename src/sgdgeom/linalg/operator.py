r"""The operator base: a symmetric ``d x d`` linear map on flat parameter vectors.

Every curvature-like quantity of sgdgeom (the diffusion matrix, one layer's block of it,
the Hessian) is a symmetric operator on the parameter space of a model, never a matrix. A
subclass implements its product, :meth:`Operator._matmat` (``(d, m) -> (d, m)``, one pass
over the data for ``m`` vectors) and, where a single vector is cheaper,
:meth:`Operator._matvec`; the base gives the rest from those products alone:

- ``A @ v`` for a ``(d,)`` vector, a ``(d, k)`` matrix or a dict by parameter name, with
  the vector's shape, dtype and device checked (:meth:`~sgdgeom.params.ParamSpace.check_vector`);
- :meth:`Operator.dense`: the explicit matrix, column block by column block, refused above
  :data:`DENSE_LIMIT` (one limit for every operator);
- :meth:`Operator.eigsh`: the top-k eigenpairs by the Krylov methods of
  :mod:`sgdgeom.linalg.krylov`, by default the one :meth:`Operator.preferred_method` names
  (a subclass says whether its passes over the data are cheap to repeat);
- :meth:`Operator.trace`: Hutchinson's estimator, where a subclass has no exact trace;
- :meth:`Operator.to_scipy`: a :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy
  vectors), for any SciPy solver.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from sgdgeom.params import ParamSpace
    >>> class Scaled(Operator):
    ...     def __init__(self, space, factor):
    ...         self.space, self.factor = space, factor
    ...     def _matmat(self, V):
    ...         return self.factor * V
    >>> A = Scaled(ParamSpace(nn.Linear(2, 2).double()), 3.0)
    >>> A.shape, float(A.dense().trace()), round(A.trace(probes=4), 6)
    ((6, 6), 18.0, 18.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sgdgeom.errors import InputError
from sgdgeom.linalg.krylov import METHODS, Eigenpairs, Method, MethodChoice, top_eigenpairs
from sgdgeom.params import ParamSpace
from sgdgeom.precision import in_full_precision

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = ["DENSE_LIMIT", "DENSE_BLOCK", "METHODS", "Operator"]

DENSE_LIMIT = 8192
""":meth:`Operator.dense` refuses ``d`` above this (a ``d x d`` float64 matrix of 512 MiB)."""

DENSE_BLOCK = 256
"""Columns of the identity multiplied at once by :meth:`Operator.dense`."""


@in_full_precision
class Operator:
    """A symmetric linear operator on the flat vectors of :attr:`space` (see the module doc).

    Attributes:
        space: the parameter space, ``d = space.dim``; vectors are ``(d,)`` in its dtype and
            on its device.
    """

    space: ParamSpace
    #: the operator's letter in messages (``D``, ``H``)
    symbol = "A"

    # ------------------------------------------------------------------ what subclasses give

    def _matvec(self, v: Tensor) -> Tensor:
        """``A v``, ``(d,) -> (d,)``; default: one column of :meth:`_matmat`."""
        return self._matmat(v[:, None])[:, 0]

    def _matmat(self, V: Tensor) -> Tensor:
        """``A V``, ``(d, m) -> (d, m)``; default: one :meth:`_matvec` per column."""
        return torch.stack([self._matvec(column.contiguous()) for column in V.T], 1)

    # ------------------------------------------------------------------ products

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``."""
        return (self.space.dim, self.space.dim)

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat ``(d,)`` vector of the operator's dtype and device."""
        self.space.check_vector(v)
        return self._matvec(v)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``m`` vectors at once, ``(d, m) -> (d, m)``."""
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] != self.space.dim:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise InputError(f"V must be a ({self.space.dim}, m) tensor, got {shape}")
        self.space.check_vector(V[:, 0], "V")
        return self._matmat(V)

    def __matmul__(self, v: Tensor | Mapping[str, Tensor]) -> Any:
        """``A @ v`` for a ``(d,)`` vector, a ``(d, k)`` matrix (one :meth:`matmat`) or a dict
        of tensors by parameter name (a dict comes back)."""
        if isinstance(v, Tensor) and v.dim() == 2:
            return self.matmat(v)
        return self.space.apply(self.matvec, v)

    # ------------------------------------------------------------------ from products alone

    def dense(self, limit: int = DENSE_LIMIT) -> Tensor:
        """The explicit ``(d, d)`` matrix, symmetrised, from products with the identity in
        blocks of :data:`DENSE_BLOCK` columns. For small operators: it refuses ``d > limit``."""
        d = self.space.dim
        if d > limit:
            raise InputError(
                f"dense() would form a {d} x {d} matrix (limit {limit}); use {self.symbol} @ v, "
                f"eigsh(k) or trace() instead, or pass a larger limit"
            )
        columns = []
        for start in range(0, d, DENSE_BLOCK):
            width = min(DENSE_BLOCK, d - start)
            E = torch.zeros(d, width, dtype=self.space.dtype, device=self.space.device)
            E[torch.arange(start, start + width), torch.arange(width)] = 1.0
            columns.append(self._matmat(E))
        A = torch.cat(columns, 1)
        return (A + A.T) / 2

    def eigsh(self, k: int, method: MethodChoice = "auto", **options: Any) -> Eigenpairs:
        """The top-k eigenpairs from products alone (:func:`~sgdgeom.linalg.top_eigenpairs`:
        ``method`` and its ``options`` ``tol``, ``oversample``, ``block``, ``max_passes``,
        ``seed``, ``progress``). A block pass multiplies ``k + oversample`` vectors at once;
        ``"auto"`` takes :meth:`preferred_method`."""
        if method == "auto":
            method = self.preferred_method()
        space = self.space
        options.setdefault("label", self.symbol)
        return top_eigenpairs(
            self._matmat, space.dim, k, space.dtype, space.device, method=method, **options
        )

    def preferred_method(self) -> Method:
        """The Krylov method ``eigsh`` takes by default: single-vector Lanczos (ARPACK) where
        a pass over the data costs about its products, since it needs the fewest products
        (a quarter to a third of block Lanczos' for tighter residuals, and no
        ``d x (k + p)·passes`` basis); block Lanczos where a pass costs much more than its
        products (an accelerator, whose kernel launches a block amortises; several
        processes, which synchronise on every pass)."""
        return "lanczos" if self._passes_are_cheap() else "block-lanczos"

    def _passes_are_cheap(self) -> bool:
        """Whether a pass costs about its products: on the CPU, where a block of ``m``
        vectors costs ``0.7 m`` (a vmapped Hessian product) to ``m`` (a layer's matmul)
        single products, and running the model again on each pass (the generic route,
        streamed captures; captures read from disk cost less) adds about one
        forward+backward, which a quarter of the products repays: top-4 of D on the
        generic route, 784-784-784-10 MLP, B = 128, 1 thread: 25 products and 5.6 s by
        Lanczos against 92 and 15.2 s by block Lanczos (``benchmarks/peers.py`` for H)."""
        return self.space.device.type == "cpu"

    def trace(self, probes: int = 64, seed: int = 0) -> float:
        """``tr A`` by Hutchinson's estimator, ``mean_z zᵀ A z`` over ``probes`` Rademacher
        vectors ``z`` (unbiased; a subclass with an exact trace overrides this)."""
        if probes < 1:
            raise InputError(f"probes must be >= 1, got {probes}")
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.space.dim, probes), generator=generator) * 2 - 1
        Z = signs.to(self.space.device, self.space.dtype)
        return float((Z * self._matmat(Z)).sum() / probes)

    def to_scipy(self) -> LinearOperator:
        """A :class:`scipy.sparse.linalg.LinearOperator` of shape ``(d, d)`` on float64
        numpy vectors (converted to the operator's dtype and device for each product)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        space = self.space

        def matmat(V: np.ndarray) -> np.ndarray:
            columns = torch.as_tensor(np.ascontiguousarray(V).reshape(space.dim, -1))
            out = self._matmat(columns.to(space.device, space.dtype))
            return out.double().cpu().numpy()

        return LinearOperator(
            (space.dim, space.dim),
            matvec=lambda v: matmat(v)[:, 0],
            matmat=matmat,
            rmatvec=lambda v: matmat(v)[:, 0],
            dtype=np.float64,
        )
