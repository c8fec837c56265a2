"""Fields over parameter space as functions of the point, for ``torch.func`` to
differentiate and ``vmap``: the per-sample gradients and the metric gradient ``∇_D f``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from sgdgeom.params import ParamSpace
from sgdgeom.persample import LossSpec, check_independent_samples, per_sample_loss

__all__ = ["metric_gradient_field", "per_sample_gradient_function"]


def per_sample_gradient_function(
    model: nn.Module, loss_fn: LossSpec
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(point, inputs, targets) ↦ G``, the ``(N, d)`` per-sample gradients of ``loss_fn``
    at the flat parameters ``point`` (``torch.func``: differentiable, and ``vmap``-able over
    points). Parameters outside the space and buffers are held at their current values.
    Refuses a model whose samples are not independent (BatchNorm or Dropout in train mode),
    naming the module."""
    check_independent_samples(model)
    space = ParamSpace(model)
    loss = per_sample_loss(loss_fn)
    constants = {n: p.detach() for n, p in model.named_parameters() if n not in space.names}
    constants |= dict(model.named_buffers())

    def single(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(functional_call(model, {**params, **constants}, (xi[None],)), yi[None])[0]

    def gradients(point: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        grads = vmap(grad(single), in_dims=(None, 0, 0))(space.unflatten(point), inputs, targets)
        return torch.cat([grads[n].reshape(len(inputs), -1) for n in space.names], 1)

    return gradients


def metric_gradient_field(
    model: nn.Module, loss_fn: LossSpec, data: tuple[Tensor, Tensor], eps: float
) -> Callable[[Tensor], Tensor]:
    """``x ↦ ∇_D f(x) = g(x)⁻¹ ∇f(x)`` (F10) at a fixed ε, as a function of the flat
    parameters that ``torch.func`` differentiates (``jvp``, ``vjp``, ``jacrev``).

    Exact through Woodbury: ``g⁻¹ ḡ = ḡ − (ε/N) G_cᵀ (I + εK)⁻¹ G_c ḡ``, with the ``(N, d)``
    per-sample gradients materialised: small models (the plane problems, tiny networks).
    """
    gradients = per_sample_gradient_function(model, loss_fn)
    inputs, targets = data

    def field(point: Tensor) -> Tensor:
        G = gradients(point, inputs, targets)
        mean = G.mean(0)
        centred = G - mean
        n = len(G)
        eye = torch.eye(n, dtype=G.dtype, device=G.device)
        weights = torch.linalg.solve(eye + eps * centred @ centred.T / n, centred @ mean)
        return mean - eps / n * centred.T @ weights

    return field
