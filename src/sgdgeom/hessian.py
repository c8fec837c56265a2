r"""The Hessian of the mean loss beside the diffusion matrix: does SGD's noise align with
the curvature?

Zhu et al. (2019, "The anisotropic noise in stochastic gradient descent") measure how
much of D lies along the Hessian's sharp directions. With
:math:`H = \frac1N \sum_i \nabla^2 f_i` (``d x d``) and D (F2, F3):

- ``cosine``: :math:`\operatorname{tr}(DH) / (\|D\|_F \|H\|_F)`, 1 when D ∝ H, by
  Hutchinson's estimator with Rademacher probes :math:`z`
  (:math:`\operatorname{tr}(DH) = \mathbb E[(Dz)\cdot(Hz)]`,
  :math:`\|D\|_F^2 = \mathbb E\|Dz\|^2`, a jackknife standard error over the probes), or
  exactly over the basis vectors (``probes=None``: small models);
- ``cosine_topk``: the same for the top-k truncations :math:`D_k = U \Lambda U^\top`,
  :math:`H_k = V M V^\top`: :math:`\sum_{ij}\lambda_i\mu_j(u_i\cdot v_j)^2 /
  (\|\lambda\|\|\mu\|)`;
- ``overlap``: :math:`\|U^\top V\|_F^2 / k \in [0, 1]`, the overlap of the top-k
  eigenspaces;
- ``rayleigh``: :math:`v_j^\top D v_j` along H's top eigenvectors, ``(k,)``, beside D's own
  top eigenvalues.

:class:`HessianOperator` is H as an operator: Hessian-vector products by ``torch.func``
(forward over reverse, ``vmap``-ped over blocks of vectors), top-k by the block methods of
:mod:`sgdgeom.eigen`. :class:`AlignmentMonitor` records the instruments along training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.eigen import Eigenpairs, operator_eigenpairs
from sgdgeom.errors import InputError
from sgdgeom.params import ParamSpace
from sgdgeom.persample import DataSource, FuncProducts, LossSpec, check_independent_samples
from sgdgeom.train import Callback, Trainer

__all__ = ["Alignment", "AlignmentMonitor", "HessianOperator", "alignment"]


class HessianOperator:
    """``H = (1/N) Σ_i ∇²f_i``, the Hessian of the mean loss at the model's parameters
    (copied at construction), as a ``(d, d)`` operator over ``model.named_parameters()``.

    Args: as :class:`~sgdgeom.diffusion.DiffusionMatrix` (any model; BatchNorm and Dropout
    in eval mode).
    """

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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.space.dim, self.space.dim)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v``, ``(d,) -> (d,)``."""
        self.space.check_vector(v)
        return self.products.hessian_vector(v, self._weights)

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``m`` vectors, ``(d, m) -> (d, m)``, in one pass over the data."""
        if V.dim() != 2 or V.shape[0] != self.space.dim:
            raise InputError(f"V must be a ({self.space.dim}, m) tensor, got {tuple(V.shape)}")
        self.space.check_vector(V[:, 0])
        return self.products.hessian_matmat(V, self._weights)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matmat(v) if v.dim() == 2 else self.matvec(v)

    def eigsh(self, k: int, method: str = "block-lanczos", **options: Any) -> Eigenpairs:
        """The k largest (algebraic) eigenpairs of H, by the block methods of
        :mod:`sgdgeom.eigen` (``options``: ``tol``, ``oversample``, ``max_passes``,
        ``seed``, ``progress``). ``"randomized"`` finds the largest in magnitude: use it
        where H's negative eigenvalues are small (near a minimum)."""
        return operator_eigenpairs(self, k, method, **options)

    def dense(self, limit: int = 4096) -> Tensor:
        """H as an explicit ``(d, d)`` matrix, from ``d`` products (small models only)."""
        if self.space.dim > limit:
            raise InputError(f"dense() would form a {self.space.dim}² matrix (limit {limit})")
        H = self.matmat(torch.eye(self.space.dim, dtype=self.space.dtype, device=self.space.device))
        return (H + H.T) / 2


@dataclass(frozen=True)
class Alignment:
    """The alignment of D with H (module doc). ``cosine_stderr`` is None when exact."""

    cosine: float
    cosine_stderr: float | None
    cosine_topk: float
    overlap: float
    rayleigh: Tensor
    d_values: Tensor
    h_values: Tensor
    probes: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cosine": self.cosine,
            "cosine_stderr": self.cosine_stderr,
            "cosine_topk": self.cosine_topk,
            "overlap": self.overlap,
            "rayleigh": self.rayleigh.tolist(),
            "d_values": self.d_values.tolist(),
            "h_values": self.h_values.tolist(),
            "probes": self.probes,
        }


def _cosine_parts(D: DiffusionMatrix, H: HessianOperator, Z: Tensor) -> Tensor:
    """Per column z of Z: ``((Dz)·(Hz), ‖Dz‖², ‖Hz‖²)``, ``(m, 3)``."""
    DZ, HZ = D.matmat(Z), H.matmat(Z)
    return torch.stack([(DZ * HZ).sum(0), DZ.square().sum(0), HZ.square().sum(0)], 1)


def _ratio(sums: Tensor) -> float:
    return float(sums[0] / (sums[1].sqrt() * sums[2].sqrt()))


def alignment(
    D: DiffusionMatrix,
    H: HessianOperator,
    k: int = 10,
    *,
    probes: int | None = 32,
    block: int = 16,
    method: str = "block-lanczos",
    seed: int = 0,
    progress: bool = False,
    d_pairs: Eigenpairs | None = None,
) -> Alignment:
    """The alignment instruments of D and H (module doc) on the same parameters and data.

    ``probes``: Rademacher probes for ``cosine`` (None: exact over the ``d`` basis
    vectors), multiplied ``block`` at a time; ``k``: the top eigenpairs of each
    (``d_pairs``: D's, if already at hand).
    """
    if D.space.names != H.space.names or D.n != H.n:
        raise InputError("D and H must be built on the same model's parameters and data")
    space = D.space
    as_space = {"dtype": space.dtype, "device": space.device}
    total = space.dim if probes is None else probes
    if probes is not None and probes < 2:
        raise InputError(f"probes must be None (exact) or >= 2, got {probes}")
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in tqdm(range(0, total, block), desc="tr(DH)", disable=not progress, leave=False):
        width = min(block, total - start)
        if probes is None:
            Z = torch.zeros(space.dim, width, **as_space)  # basis vectors start.. start+width
            Z[torch.arange(start, start + width), torch.arange(width)] = 1.0
        else:
            Z = (torch.randint(0, 2, (space.dim, width), generator=generator) * 2 - 1).to(
                **as_space
            )
        parts.append(_cosine_parts(D, H, Z))
    parts_all = torch.cat(parts).double()
    sums = parts_all.sum(0)
    stderr = None
    if probes is not None:  # jackknife over the probes
        leave_one_out = torch.tensor([_ratio(sums - row) for row in parts_all])
        stderr = float(
            math.sqrt((total - 1) / total * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
        )
    if d_pairs is None or len(d_pairs.values) != k:
        d_pairs = D.eigsh(k, method, seed=seed, progress=progress)
    h_pairs = H.eigsh(k, method, seed=seed, progress=progress)
    U, V = d_pairs.vectors.double(), h_pairs.vectors.double()
    lam, mu = d_pairs.values.double(), h_pairs.values.double()
    overlaps = (U.T @ V).square()
    return Alignment(
        cosine=_ratio(sums),
        cosine_stderr=stderr,
        cosine_topk=float(lam @ overlaps @ mu / (lam.norm() * mu.norm())),
        overlap=float(overlaps.sum() / k),
        rayleigh=(h_pairs.vectors * D.matmat(h_pairs.vectors)).sum(0).double().cpu(),
        d_values=lam.cpu(),
        h_values=mu.cpu(),
        probes=probes,
    )


class AlignmentMonitor(Callback):
    """Records the alignment of D with H on a fixed probe batch every ``every`` epochs:
    ``alignment/cosine`` (and ``_stderr``), ``alignment/cosine_topk``,
    ``alignment/overlap``, ``alignment/rayleigh_top`` (``v_1ᵀ D v_1 / λ_max(D)``),
    ``alignment/d_top`` and ``alignment/h_top`` (λ_max of D and of H)."""

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        loss_fn: LossSpec = "cross_entropy",
        *,
        every: int = 1,
        k: int = 5,
        probes: int | None = 16,
        seed: int = 0,
    ) -> None:
        if every < 1 or k < 1:
            raise InputError(f"every and k must be >= 1, got {every} and {k}")
        self.probe, self.loss_fn = probe, loss_fn
        self.every, self.k, self.probes, self.seed = every, k, probes, seed

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The instruments at the model's current parameters (in eval mode)."""
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            data = (self.probe[0].to(device), self.probe[1].to(device))
            D = DiffusionMatrix(model, self.loss_fn, data, chunk_size=None)
            H = HessianOperator(model, self.loss_fn, data, chunk_size=None)
            result = alignment(D, H, self.k, probes=self.probes, seed=self.seed)
        finally:
            model.train(was_training)
        top = float(result.d_values[0])
        return {
            "alignment/cosine": result.cosine,
            "alignment/cosine_stderr": result.cosine_stderr or 0.0,
            "alignment/cosine_topk": result.cosine_topk,
            "alignment/overlap": result.overlap,
            "alignment/rayleigh_top": float(result.rayleigh[0]) / top if top > 0 else 0.0,
            "alignment/d_top": top,
            "alignment/h_top": float(result.h_values[0]),
        }

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch % self.every == 0:
            metrics.update(self.measure(trainer.model))
