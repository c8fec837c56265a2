r"""What the deterministic models of :mod:`sgdgeom.geometry` are compared with: ensembles of
real SGD runs, and the Chaudhari–Soatto SDE, each advanced as one batch (``vmap``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from sgdgeom.errors import InputError
from sgdgeom.geometry.fields import per_sample_gradient_function
from sgdgeom.persample import LossSpec

__all__ = ["chaudhari_soatto_sde", "sgd_ensemble"]


def _snapshots(steps: int, every: int) -> list[int]:
    if steps < 1 or every < 1:
        raise InputError(f"steps and every must be >= 1, got steps={steps}, every={every}")
    return list(range(0, steps + 1, every))


def sgd_ensemble(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    runs: int,
    every: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """``runs`` independent SGD runs from ``x0`` (``(d,)``), all advanced together
    (``vmap`` over runs), each with its own minibatches drawn with replacement:
    ``x ← x − lr · (1/b) Σ_{i∈batch} ∇f_i(x)``.

    The minibatch gradient is the mean of per-sample gradients, so BatchNorm or Dropout in
    train mode is refused (:func:`per_sample_gradient_function`): call ``model.eval()``.

    Returns the iterates every ``every`` steps, ``iterates`` ``(runs, K, d)``, their mean
    ``(K, d)`` and covariance ``(K, d, d)`` over runs, at times ``t_k = k·lr`` (the flows'
    time unit is one unit of learning rate).
    """
    inputs, targets = data
    n = len(inputs)
    kept = _snapshots(steps, every)
    step_gradient = vmap(per_sample_gradient_function(model, loss_fn), in_dims=(0, 0, 0))
    x = x0.detach().expand(runs, -1).clone()
    iterates = [x.clone()]
    with torch.no_grad():
        for k in range(1, steps + 1):
            idx = torch.randint(0, n, (runs, batch_size), generator=generator).to(x.device)
            x = x - lr * step_gradient(x, inputs[idx], targets[idx]).mean(1)
            if k % every == 0:
                iterates.append(x.clone())
    return _ensemble_statistics(lr * np.array(kept), torch.stack(iterates, 1))


def _ensemble_statistics(t: np.ndarray, iterates: Tensor) -> dict[str, np.ndarray]:
    mean = iterates.mean(0)
    centred = iterates - mean
    cov = torch.einsum("rkd,rke->kde", centred, centred) / max(len(iterates) - 1, 1)
    return {
        "t": t,
        "mean": mean.cpu().numpy(),
        "cov": cov.cpu().numpy(),
        "iterates": iterates.cpu().numpy(),
    }


def chaudhari_soatto_sde(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    *,
    lr: float,
    batch_size: int,
    t_end: float,
    dt: float,
    paths: int,
    every: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    r"""Euler-Maruyama paths of :math:`dx = -\nabla f\,dt + \sqrt{2\beta^{-1} D}\,dW` with
    :math:`\beta^{-1} = \eta / (2b)` (Chaudhari & Soatto 2018), all advanced together
    (``vmap`` over paths). The noise :math:`\sqrt{2\beta^{-1}D}\,dW` is drawn as
    :math:`\sqrt{2\beta^{-1}/N}\,G_c^\top \xi`, :math:`\xi \sim N(0, dt\,I_N)`, which has
    the covariance :math:`2\beta^{-1} D\,dt` without a square root of D.

    Returns the same keys as :func:`sgd_ensemble`, every ``every`` steps of ``dt``.
    """
    inputs, targets = data
    temperature = lr / (2 * batch_size)
    steps = round(t_end / dt)
    kept = _snapshots(steps, every)
    gradients = vmap(per_sample_gradient_function(model, loss_fn), in_dims=(0, None, None))
    x = x0.detach().expand(paths, -1).clone()
    n = len(inputs)
    iterates = [x.clone()]
    with torch.no_grad():
        for k in range(1, steps + 1):
            G = gradients(x, inputs, targets)  # (paths, N, d)
            mean = G.mean(1)
            xi = torch.randn(paths, n, dtype=x.dtype, generator=generator).to(x.device)
            noise = torch.einsum("pn,pnd->pd", xi, G - mean[:, None])
            x = x - mean * dt + noise * (2 * temperature * dt / n) ** 0.5
            if k % every == 0:
                iterates.append(x.clone())
    return _ensemble_statistics(dt * np.array(kept), torch.stack(iterates, 1))
