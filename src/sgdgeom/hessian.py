r"""The Hessian of the mean loss, :math:`H = \frac1N \sum_i \nabla^2 f_i` (``d x d``), as an
operator beside the diffusion matrix: Hessian-vector products by ``torch.func`` (forward
over reverse, ``vmap``-ped over blocks of vectors), top-k by the Krylov methods of
:mod:`sgdgeom.linalg`. How D aligns with it is :mod:`sgdgeom.alignment`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sgdgeom._deprecated import moved
from sgdgeom.errors import InputError
from sgdgeom.linalg import Eigenpairs, MethodChoice, Operator
from sgdgeom.params import ParamSpace
from sgdgeom.persample import DataSource, FuncProducts, LossSpec, check_independent_samples
from sgdgeom.precision import in_full_precision

__all__ = ["HessianOperator"]

__getattr__ = moved(
    "sgdgeom.hessian",
    {
        "Alignment": "sgdgeom.alignment",
        "alignment": "sgdgeom.alignment",
        "AlignmentMonitor": "sgdgeom.monitors",
    },
)


@in_full_precision
class HessianOperator(Operator):
    """``H = (1/N) Σ_i ∇²f_i``, the Hessian of the mean loss at the model's parameters
    (copied at construction), as a ``(d, d)`` operator over ``model.named_parameters()``.

    Args: as :class:`~sgdgeom.diffusion.DiffusionMatrix` (any model; BatchNorm and Dropout
    in eval mode).
    """

    symbol = "H"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec = "cross_entropy",
        data: Any = None,
        *,
        chunk_size: int | None = 1024,
        progress: bool = False,
    ) -> None:
        if data is None:
            raise InputError("data is required: a batch (x, y) or a DataLoader")
        check_independent_samples(model)
        self.space = ParamSpace(model)
        source = DataSource(data, chunk_size, self.space.device)
        self.products = FuncProducts(model, loss_fn, source, self.space, progress=progress)
        self.n = self.products.n
        self._weights = torch.full(
            (self.n,), 1.0 / self.n, dtype=self.space.dtype, device=self.space.device
        )

    def __repr__(self) -> str:
        return f"HessianOperator(d={self.space.dim}, N={self.n})"

    def _matvec(self, v: Tensor) -> Tensor:
        """``H v``, ``(d,) -> (d,)``: forward over reverse."""
        return self.products.hessian_vector(v, self._weights)

    def _matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``m`` vectors, ``(d, m) -> (d, m)``, in one pass over the data."""
        return self.products.hessian_matmat(V, self._weights)

    def eigsh(self, k: int, method: MethodChoice = "auto", **options: Any) -> Eigenpairs:
        """The k largest (algebraic) eigenpairs of H, by the Krylov methods of
        :mod:`sgdgeom.linalg.krylov` (``options``: ``tol``, ``oversample``, ``max_passes``,
        ``seed``, ``progress``); ``"auto"``: single-vector Lanczos on the CPU, block Lanczos
        on an accelerator (:meth:`~sgdgeom.linalg.Operator.preferred_method`).
        ``"randomized"`` finds the largest in magnitude: use it where H's negative
        eigenvalues are small (near a minimum)."""
        return super().eigsh(k, method, **options)
