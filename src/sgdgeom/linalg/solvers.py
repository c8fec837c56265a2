"""Linear solves with a symmetric positive definite operator given only its products."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sgdgeom.errors import InputError

__all__ = ["conjugate_gradients"]


def conjugate_gradients(
    matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_steps: int = 100
) -> tuple[Tensor, int]:
    """``x`` with ``A x = b`` for a symmetric positive definite operator, and the number of
    products: conjugate gradients (Hestenes–Stiefel) from ``x = 0`` until ``‖b − A x‖ ≤ tol
    ‖b‖``. For ``A = I + εK`` with ``ελ_max < 1`` the condition number is below 2, and the
    error falls at least 5.8-fold per step (``(√κ − 1)/(√κ + 1) < 0.172``)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    target = tol * tol * rs
    for step in range(max_steps):
        if rs <= target:
            return x, step
        ap = matvec(p)
        alpha = rs / float(p @ ap)
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rs, previous = float(r @ r), rs
        p.mul_(rs / previous).add_(r)
    reached = math.sqrt(rs * tol * tol / target) if target > 0 else math.inf
    raise InputError(
        f"conjugate gradients reached a relative residual of {reached:.2e} "
        f"(asked {tol:.1e}) in {max_steps} steps: the system is not well conditioned "
        f"(ε λ_max close to 1?) or the products are not finite"
    )
