r"""Does SGD's noise align with the curvature? The diffusion matrix against the Hessian.

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

H is :class:`~sgdgeom.hessian.HessianOperator`; the monitor that records these instruments
along training is :class:`~sgdgeom.monitors.AlignmentMonitor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.hessian import HessianOperator
from sgdgeom.linalg import Eigenpairs, MethodChoice

__all__ = ["Alignment", "alignment"]


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
    method: MethodChoice = "auto",
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
    total = space.dim if probes is None else probes
    if probes is not None and probes < 2:
        raise InputError(f"probes must be None (exact) or >= 2, got {probes}")
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in tqdm(range(0, total, block), desc="tr(DH)", disable=not progress, leave=False):
        width = min(block, total - start)
        if probes is None:
            Z = torch.zeros(space.dim, width, dtype=space.dtype, device=space.device)  # basis
            Z[torch.arange(start, start + width), torch.arange(width)] = 1.0
        else:
            signs = torch.randint(0, 2, (space.dim, width), generator=generator) * 2 - 1
            Z = signs.to(dtype=space.dtype, device=space.device)
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
