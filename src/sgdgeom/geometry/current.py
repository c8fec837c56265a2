r"""The steady state of SGD in Fioresi et al.'s account (F11, F12): the current j of (F12),
and the curl of the metric gradient field, which decides whether the potential Φ of (F11)
exists at all."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import EpsilonLike
from sgdgeom.errors import InputError
from sgdgeom.geometry.fields import metric_gradient_field
from sgdgeom.metric import DiffusionMetric, Inverse, inverse_of
from sgdgeom.params import ParamSpace
from sgdgeom.persample import LossSpec

__all__ = ["Curl", "Current", "curl", "current"]


@dataclass(frozen=True)
class Current:
    """The Chaudhari–Soatto current of (F12) at one point (:func:`current`).

    Attributes:
        j: ``(d,)``, ``j = −∇f + D̃ ∇Φ − β⁻¹ ∇·D̃`` with ``D̃ = I + εD`` and ``∇Φ = ∇_D f``.
        divergence_term: ``(d,)``, ``β⁻¹ ∇·D̃ = (ε/β) ∇·D``.
        ratio: ``‖(ε/β) ∇·D‖ / ‖∇f‖``, what (F12) needs to be small for ``j ≈ 0``.
        eps: the ε of the metric.
        stderr: ``(d,)`` standard error of ``divergence_term`` (Hutchinson), else None.
    """

    j: Tensor
    divergence_term: Tensor
    ratio: float
    eps: float
    stderr: Tensor | None


def current(
    D: DiffusionMatrix,
    beta: float,
    eps: EpsilonLike = "auto",
    *,
    inverse: Inverse = "exact",
    probes: int | None = None,
    seed: int = 0,
    exact: bool | None = None,
) -> Current:
    """The current ``j(x)`` of Fioresi et al. (F12) at D's point, with ``∇Φ = ∇_D f`` (F11).

    ``j = −∇f + D̃ ∇_D f − β⁻¹ ∇·D̃`` with ``D̃ = g = I + εD``. With the exact metric
    gradient ``D̃ ∇_D f = ∇f``, so ``j = −(ε/β) ∇·D``; the weak field
    (``inverse="weak"``, ``∇_D f ≈ (I − εD)∇f``) leaves ``−ε² D² ∇f`` besides. The paper
    argues ``∇·D̃ = 0`` under (F9), hence ``j = 0``; :attr:`Current.ratio` measures how far
    that holds. ``probes``: Hutchinson probes for ``∇·D`` (None: exact, small models).
    """
    inverse = inverse_of(inverse, exact)
    if not beta > 0:
        raise InputError(f"beta must be > 0, got {beta}")
    metric = DiffusionMetric(D, eps=eps)
    gradient = D.mean_gradient()
    divergence = D.divergence(probes=probes, seed=seed)
    scale = metric.eps / beta
    term = scale * divergence.value
    j = -gradient + metric.apply(metric.gradient(inverse)) - term
    norm = float(gradient.norm())
    ratio = float(term.norm()) / norm if norm > 0 else float("inf")
    stderr = scale * divergence.stderr if divergence.stderr is not None else None
    return Current(j, term, ratio, float(metric.eps), stderr)


@dataclass(frozen=True)
class Curl:
    """The curl of ``∇_D f`` in 2-D sections (:func:`curl`).

    Attributes:
        values: ``(m,)``, ``vᵀ J u − uᵀ J v`` for each section ``(u, v)`` (orthonormal),
            ``J`` the Jacobian of ``∇_D f``: zero for every section iff a potential Φ with
            ``∇Φ = ∇_D f`` (F11) exists near the point.
        relative: ``(m,)``, ``|value|`` over the Frobenius norm of ``J`` restricted to the
            section.
        sections: ``(m, 2, d)``, the ``u`` and ``v`` of each section.
    """

    values: Tensor
    relative: Tensor
    sections: Tensor


def curl(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    eps: float,
    *,
    sections: int = 8,
    seed: int = 0,
) -> Curl:
    """The curl of the metric gradient field ``∇_D f`` at the model's parameters, which
    decides whether the potential Φ of (F11) exists at all.

    With ``d = 2`` the one section is the plane itself, ``(e₁, e₂)``: the exact curl
    ``∂₁F₂ − ∂₂F₁``. Otherwise ``sections`` random orthonormal pairs ``(u, v)``; each costs
    two JVPs of :func:`metric_gradient_field`.
    """
    space = ParamSpace(model)
    point = space.vector(model).detach()
    field = metric_gradient_field(model, loss_fn, data, eps)
    dtype, device = point.dtype, point.device
    if space.dim == 2:
        pairs = torch.eye(2, dtype=dtype, device=device)[None]
    else:
        if sections < 1:
            raise InputError(f"sections must be >= 1, got {sections}")
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(sections, space.dim, 2, generator=generator, dtype=dtype)
        pairs = torch.linalg.qr(gaussian.to(device))[0].transpose(1, 2)
    values, relative = [], []
    for u, v in pairs:
        ju, jv = (torch.func.jvp(field, (point,), (w,))[1] for w in (u, v))
        block = torch.stack([torch.stack([u @ ju, u @ jv]), torch.stack([v @ ju, v @ jv])])
        value = v @ ju - u @ jv
        values.append(value)
        relative.append(value.abs() / block.norm().clamp_min(torch.finfo(dtype).tiny))
    return Curl(torch.stack(values), torch.stack(relative), pairs)
