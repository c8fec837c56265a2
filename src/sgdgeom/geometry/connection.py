r"""The Levi-Civita connection of the diffusion metric: its Christoffel symbols (Fioresi et
al., eq. 4, 5, 7; ``docs/design.md``).

With :math:`g = I + \varepsilon D` and a constant ε, differentiating the covariance (F3)
gives :math:`\partial_u D_{vz} + \partial_v D_{uz} - \partial_z D_{uv} = 2\,
\mathrm{Cov}_i(\partial_u\partial_v f_i, \partial_z f_i)`, hence (F5)

.. math::

    \Gamma^w_{uv} = \varepsilon\, [g^{-1}]^{wz}\, \mathrm{Cov}_i(\partial_u\partial_v f_i,
    \partial_z f_i) \quad\text{exactly},\qquad
    \Gamma^w_{uv} \approx \varepsilon\, \mathrm{Cov}_i(\partial_u\partial_v f_i,
    \partial_w f_i) \quad\text{(weak field, F7)}.

Contracted with a velocity, :math:`\Gamma(\dot x, \dot x) = \varepsilon\,
\mathrm{Cov}_i(\dot x^\top H_i \dot x,\ g_i)` (weak field; the exact form applies
:math:`g^{-1}`): per-sample second directional derivatives, then one VJP, for any model
size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.metric import DiffusionMetric, Inverse, inverse_of
from sgdgeom.params import ParamSpace
from sgdgeom.persample import LossSpec, per_sample_loss

__all__ = ["DENSE_LIMIT", "christoffel", "christoffel_contract", "generic_matrix"]

DENSE_LIMIT = 256  # christoffel() forms a d x d x d tensor


def christoffel(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    eps: float,
    inverse: Inverse = "exact",
    *,
    exact: bool | None = None,
) -> Tensor:
    """The dense Christoffel symbols ``Γ[w, u, v]`` (``d x d x d``) of ``g = I + εD`` at the
    model's parameters, from explicit per-sample gradients and Hessians (tiny models):
    ``inverse="exact"`` (F5) or ``"weak"`` (F7)."""
    inverse = inverse_of(inverse, exact)
    space = ParamSpace(model)
    if space.dim > DENSE_LIMIT:
        raise InputError(
            f"christoffel() forms a {space.dim}^3 tensor (limit {DENSE_LIMIT}); "
            f"use christoffel_contract()"
        )
    x, y = data
    loss = per_sample_loss(loss_fn)
    names = space.names
    flat0 = space.vector(model)

    def sample_loss(flat: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        params = dict(zip(names, space.unflatten(flat).values(), strict=True))
        return loss(functional_call(model, params, (xi[None],)), yi[None])[0]

    G = vmap(grad(sample_loss), in_dims=(None, 0, 0))(flat0, x, y)  # (N, d)
    H = vmap(hessian(sample_loss), in_dims=(None, 0, 0))(flat0, x, y)  # (N, d, d)
    n = len(x)
    cov = torch.einsum("nuv,nz->zuv", H - H.mean(0), G - G.mean(0)) / n  # Cov(∂u∂v f, ∂z f)
    if inverse == "weak":
        return eps * cov
    D = (G - G.mean(0)).T @ (G - G.mean(0)) / n
    g_inv = torch.linalg.inv(torch.eye(space.dim, dtype=D.dtype) + eps * D)
    return eps * torch.einsum("wz,zuv->wuv", g_inv, cov)


def generic_matrix(
    model: nn.Module, loss_fn: LossSpec, data: tuple[Tensor, Tensor]
) -> DiffusionMatrix:
    """D of the model on one batch by the generic route, which has the second derivatives
    the geometry needs."""
    return DiffusionMatrix(model, loss_fn, data, route="generic", chunk_size=None)


def christoffel_contract(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    eps: float,
    xdot: Tensor,
    inverse: Inverse = "exact",
    D: DiffusionMatrix | None = None,
    *,
    exact: bool | None = None,
) -> Tensor:
    """``Γ(ẋ, ẋ)`` matrix-free: ``ε Cov_i(ẋᵀH_iẋ, g_i)``, with ``g⁻¹`` applied for
    ``inverse="exact"``."""
    inverse = inverse_of(inverse, exact)
    D = D if D is not None else generic_matrix(model, loss_fn, data)
    q = D.products.second_directional(xdot)
    weak = eps * D.products.vjp(q - q.mean()) / D.n
    return DiffusionMetric(D, eps).solve(weak) if inverse == "exact" else weak
