r"""The largest eigenvalue of a small symmetric PSD matrix (the ``N x N`` Gram matrix K):
exactly by Lanczos on the host, or bracketed by bounds computed on its device with no host
read (the ``eps="auto"`` of a GPU step)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

from sgdgeom.errors import InputError
from sgdgeom.linalg.krylov import lanczos_top

__all__ = ["bound_squarings", "compiled_bounds", "top_eigenvalue", "top_eigenvalue_bounds"]


def top_eigenvalue(K: Tensor, tol: float = 1e-10) -> float:
    """The largest eigenvalue of a symmetric PSD ``(n, n)`` matrix by Lanczos with full
    reorthogonalisation, in float64 numpy on the CPU (an ``n x n`` problem is too small for
    an accelerator, and torch's per-call overhead would dominate), from a fixed start
    vector, so it is deterministic (:func:`lanczos_top`)."""
    matrix = K.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise InputError(
            "the Gram matrix has NaN or infinite entries: the per-sample gradients are not "
            "finite (a diverged loss?)"
        )
    return lanczos_top(lambda q: matrix @ q, len(matrix), tol)[0]


def bound_squarings(n: int, slack: float = 0.01) -> int:
    """The squarings :func:`top_eigenvalue_bounds` takes for an ``(n, n)`` matrix: the
    least ``s`` with ``n^(1/2^s) ≤ 1 + slack``."""
    return max(0, math.ceil(math.log2(math.log(max(n, 2)) / math.log1p(slack))))


def top_eigenvalue_bounds(K: Tensor, slack: float = 0.01) -> tuple[Tensor, Tensor]:
    r"""Bounds ``θ ≤ λ_max(K) ≤ λ̄`` of a symmetric PSD ``(n, n)`` matrix, as 0-d tensors on
    K's device, with no host read: a fixed number ``s`` of squarings, so nothing waits for
    the device (the ``eps="auto"`` of a GPU step, :class:`~sgdgeom.optim.DiffusionMetricSGD`).

    With :math:`p = 2^s` and :math:`T_p = \operatorname{tr} K^p = \sum_i \lambda_i^p`,

    .. math::

        \lambda_{\max} \le \bar\lambda = T_p^{1/p} \le r^{1/p} \lambda_{\max}
        \quad (r = \operatorname{rank} K \le n),

    and ``s`` is the least with :math:`n^{1/p} \le 1 + \text{slack}` (10 squarings at
    ``n = 256`` and the default 1%), whatever the spectrum. Each squaring is rescaled by its
    trace, ``M ← M² / tr M²``, and :math:`\log T_p` is summed in float64 at the end, so nothing
    overflows. ``θ`` is the Rayleigh quotient of K at the column of :math:`M \propto K^p`
    with the largest diagonal entry: a lower bound, as any Rayleigh quotient, and close to
    :math:`\lambda_{\max}` unless the top eigenvalues cluster. Cost: ``s`` products of
    ``n x n`` matrices. A K with NaN or infinite entries gives NaN bounds. Both bounds hold
    up to the rounding of K's dtype (and of TF32, if the caller enabled it for matrix
    products)."""
    n = len(K)
    squarings = bound_squarings(n, slack)
    trace = K.diagonal().sum()
    positive = trace > 0
    M = K / torch.where(positive, trace, 1.0)
    # t_k = tr M², M ← M²/t_k: then log λ̄ = log tr K + Σ_k 2⁻ᵏ log t_k (three kernels a
    # squaring: on a GPU, launches are most of this function's time)
    traces = K.new_empty(squarings)
    for k in range(squarings):
        M = M @ M
        torch.sum(M.diagonal(), dim=0, out=traces[k])
        M /= traces[k]
    weights = torch.exp2(-torch.arange(1, squarings + 1, dtype=torch.float64, device=K.device))
    log_upper = trace.double().log() + (traces.double().log() * weights).sum()
    upper = torch.where(positive, log_upper.exp(), 0.0)
    upper = torch.where(K.isfinite().all(), upper, math.nan)
    u = M.gather(1, M.diagonal().argmax().expand(n, 1))[:, 0]
    lower = (u @ (K @ u)) / (u @ u)
    return torch.where(positive, lower.double(), 0.0), upper


def compiled_bounds(K: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`top_eigenvalue_bounds` through ``torch.compile`` (``mode="reduce-overhead"``:
    a CUDA graph on a GPU), one compilation per size; the bounds are copied out of the
    graph's memory, which the next call reuses."""
    lower, upper = _compiled_bounds()(K)
    return lower.clone(), upper.clone()


@cache
def _compiled_bounds() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    return torch.compile(
        top_eigenvalue_bounds, mode="reduce-overhead", dynamic=False, fullgraph=True
    )
