r"""Flows and geodesics of the diffusion metric along real trajectories (Fioresi et al.,
eq. 8-10), and the terms the reduction (F8) → (F10) drops.

The geodesic equation is (F8) with the sign of ``docs/design.md``,
:math:`\ddot x + \Gamma(\dot x, \dot x) = -H \dot x` (the printed equation has the force
term's sign flipped relative to the GD equation above it and to F10). Points ``x`` are flat
parameter vectors (:class:`~sgdgeom.params.ParamSpace` order); the model's parameters are
set to ``x`` for each evaluation (the model is modified in place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.geometry.connection import christoffel_contract, generic_matrix
from sgdgeom.metric import DiffusionMetric, Inverse, inverse_of
from sgdgeom.params import ParamSpace, set_parameters
from sgdgeom.persample import LossSpec, per_sample_loss

__all__ = [
    "RESIDUAL_LEVELS",
    "Trajectory",
    "geodesic",
    "gradient_flow",
    "hessian_vector",
    "metric_flow",
    "residuals",
]


@dataclass
class Trajectory:
    """A trajectory sampled at ``t`` (``(T,)``): positions ``x`` (``(T, d)``), velocities
    ``v`` (``(T, d)``), the mean loss ``f`` (``(T,)``) and, for a second-order equation,
    the accelerations ``a`` (``(T, d)``) that its right-hand side gives at each point."""

    t: np.ndarray
    x: np.ndarray
    v: np.ndarray
    f: np.ndarray
    info: dict[str, Any]
    a: np.ndarray | None = None


def _integrate(
    rhs: Callable[[float, np.ndarray], np.ndarray],
    y0: np.ndarray,
    t_eval: np.ndarray,
    rtol: float,
    atol: float,
    method: str,
) -> Any:
    from scipy.integrate import solve_ivp

    result = solve_ivp(
        rhs,
        (float(t_eval[0]), float(t_eval[-1])),
        y0,
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
        method=method,
    )
    if not result.success:
        raise RuntimeError(f"the integrator failed: {result.message}")
    return result


def _loss_and_gradient(
    model: nn.Module, loss_fn: LossSpec, data: tuple[Tensor, Tensor]
) -> tuple[float, Tensor]:
    model.zero_grad(set_to_none=True)
    value = per_sample_loss(loss_fn)(model(data[0]), data[1]).mean()
    value.backward()
    space = ParamSpace(model)
    grads = [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in space.params(model).values()
    ]
    return value.item(), space.flatten(grads)


def _losses_along(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    xs: np.ndarray,
    dtype: torch.dtype,
) -> np.ndarray:
    """The mean loss at each point of a sampled trajectory."""
    values = []
    for x in xs:
        set_parameters(model, torch.as_tensor(x, dtype=dtype))
        values.append(_loss_and_gradient(model, loss_fn, data)[0])
    return np.array(values)


def _flow(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    t: np.ndarray,
    velocity: Callable[[], Tensor],
    rtol: float,
    atol: float,
    method: str,
    label: str,
) -> Trajectory:
    dtype = x0.dtype

    def rhs(_: float, y: np.ndarray) -> np.ndarray:
        set_parameters(model, torch.as_tensor(y, dtype=dtype))
        return velocity().double().numpy()

    result = _integrate(rhs, x0.double().numpy(), t, rtol, atol, method)
    xs = result.y.T
    vs = np.stack([rhs(0.0, x) for x in xs])
    fs = _losses_along(model, loss_fn, data, xs, dtype)
    return Trajectory(result.t, xs, vs, fs, {"flow": label, "nfev": result.nfev})


def gradient_flow(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    t: np.ndarray,
    *,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "RK45",
) -> Trajectory:
    """GD flow ``ẋ = −∇f`` from ``x0``, by an adaptive solver (scipy ``solve_ivp``)."""
    return _flow(
        model,
        loss_fn,
        data,
        x0,
        t,
        lambda: -_loss_and_gradient(model, loss_fn, data)[1],
        rtol,
        atol,
        method,
        "gd",
    )


def metric_flow(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    t: np.ndarray,
    eps: float,
    *,
    inverse: Inverse = "exact",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "RK45",
    exact: bool | None = None,
) -> Trajectory:
    """The metric-gradient flow (F10): ``ẋ = −g⁻¹∇f`` (``inverse="exact"``) or
    ``−(I − εD)∇f`` (``"weak"``)."""
    inverse = inverse_of(inverse, exact)

    def velocity() -> Tensor:
        return -DiffusionMetric(generic_matrix(model, loss_fn, data), eps).gradient(inverse)

    return _flow(
        model,
        loss_fn,
        data,
        x0,
        t,
        velocity,
        rtol,
        atol,
        method,
        f"metric-{inverse}",
    )


def geodesic(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    t: np.ndarray,
    eps: float,
    *,
    inverse: Inverse = "exact",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "RK45",
    exact: bool | None = None,
) -> Trajectory:
    """The geodesic equation (F8) with the sign of ``docs/design.md``,
    ``ẍ + Γ(ẋ, ẋ) = −H ẋ``, from ``x(0) = x0`` and ``ẋ(0) = −g⁻¹∇f(x0)``; ``Γ`` exact or
    weak-field (F7) by ``inverse``."""
    inverse = inverse_of(inverse, exact)
    dtype, d = x0.dtype, len(x0)
    set_parameters(model, x0)
    v0 = -DiffusionMetric(generic_matrix(model, loss_fn, data), eps).gradient("exact")

    def acceleration(x: Tensor, v: Tensor) -> Tensor:
        set_parameters(model, x)
        D = generic_matrix(model, loss_fn, data)
        gamma = christoffel_contract(model, loss_fn, data, eps, v, inverse, D)
        return -gamma - hessian_vector(D, v)

    def rhs(_: float, y: np.ndarray) -> np.ndarray:
        x, v = (torch.as_tensor(part, dtype=dtype) for part in (y[:d], y[d:]))
        return np.concatenate([v.double().numpy(), acceleration(x, v).double().numpy()])

    result = _integrate(
        rhs, np.concatenate([x0.double().numpy(), v0.double().numpy()]), t, rtol, atol, method
    )
    xs, vs = result.y[:d].T, result.y[d:].T
    fs = _losses_along(model, loss_fn, data, xs, dtype)
    accelerations = np.stack(
        [
            acceleration(*(torch.as_tensor(part, dtype=dtype) for part in (x, v))).double().numpy()
            for x, v in zip(xs, vs, strict=True)
        ]
    )
    return Trajectory(
        result.t,
        xs,
        vs,
        np.array(fs),
        {"flow": f"geodesic-{inverse}", "nfev": result.nfev},
        accelerations,
    )


def hessian_vector(D: DiffusionMatrix, v: Tensor) -> Tensor:
    """``H v`` of the mean loss, ``(1/N) Σ_i H_i v``, forward-over-reverse."""
    weights = torch.full((D.n,), 1.0 / D.n, dtype=v.dtype, device=v.device)
    return D.products.hessian_vector(v, weights)


def residuals(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    trajectory: Trajectory,
    eps: float,
) -> dict[str, np.ndarray]:
    r"""The terms the reduction (F8) → (F10) drops, along a geodesic, as functions of t,
    each beside a kept term of the same equation.

    ``ẍ`` is the geodesic equation's own right-hand side at each stored point
    (:attr:`Trajectory.a`), not a finite difference. With :math:`w_i = f_i - \bar f`:

    *Acceleration level*, the geodesic equation (F8) ``ẍ + Γ(ẋ, ẋ) = −H ẋ``, beside the
    kept force ``force`` :math:`= \|H\dot x\|`:

    - ``third_derivative``: :math:`\varepsilon\,\mathrm{Cov}_i(f_i, T_i[\dot x,\dot x])`, the
      part of the (F9) integrand :math:`\frac{\varepsilon}{N^2}\sum_\alpha \hat f_\alpha
      \frac{d^2}{dt^2}\partial_k \hat f_\alpha` with the third derivatives of the ``f_i``;
    - ``hessian_acceleration``: :math:`\varepsilon\,\mathrm{Cov}_i(f_i, H_i \ddot x)`, the
      rest of that integrand (``d²/dt² ∇f_i = T_i[ẋ,ẋ] + H_i ẍ``; it vanishes only if
      ``ẍ = 0``, which (F9) also assumes without saying);
    - ``d_xddot``: :math:`\varepsilon D \ddot x`, the :math:`\nabla\hat f\cdot\ddot x` part of
      :math:`d^2\hat f/dt^2` left out after (F8).

    *Velocity level*, the once-integrated equation (F10) ``g ẋ = −∇f``, beside the kept
    gradient ``gradient`` :math:`= \|\nabla f\|`:

    - ``eps_over_n2``: :math:`\varepsilon\,\mathrm{Cov}_i(f_i, H_i \dot x)`, the term
      :math:`\frac{\varepsilon}{N^2}\sum_\alpha \hat f_\alpha \frac{d}{dt}\partial_k\hat
      f_\alpha` the paper discards as small.

    Each is a norm; :data:`RESIDUAL_LEVELS` maps each term to the kept term it is compared
    with.
    """
    if trajectory.a is None:
        raise InputError(
            "residuals need the accelerations ẍ of a second-order equation: pass a "
            "trajectory from geometry.geodesic"
        )
    rows = [
        _residuals_at(model, loss_fn, data, x, v, a, eps)
        for x, v, a in zip(trajectory.x, trajectory.v, trajectory.a, strict=True)
    ]
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


RESIDUAL_LEVELS = {
    "third_derivative": "force",
    "hessian_acceleration": "force",
    "d_xddot": "force",
    "eps_over_n2": "gradient",
}
"""Each dropped term of :func:`residuals` and the kept term of its own equation."""


def _residuals_at(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x: np.ndarray,
    v: np.ndarray,
    a: np.ndarray,
    eps: float,
) -> dict[str, float]:
    """The dropped terms of :func:`residuals` at one point ``(x, ẋ, ẍ)``."""
    dtype = torch.float64
    set_parameters(model, torch.as_tensor(x, dtype=dtype))
    D = generic_matrix(model, loss_fn, data)
    products = D.products
    losses = products.losses()
    w = (losses - losses.mean()) / D.n  # (1/N) Σ_i (f_i − f̄) ∇ s_i = Cov_i(f_i, ∇ s_i)
    velocity, acceleration = (torch.as_tensor(t, dtype=dtype) for t in (v, a))
    return {
        "third_derivative": eps * float(products.third_directional(velocity, w).norm()),
        "hessian_acceleration": eps * float(products.hessian_vector(acceleration, w).norm()),
        "eps_over_n2": eps * float(products.hessian_vector(velocity, w).norm()),
        "d_xddot": eps * float(D.matvec(acceleration).norm()),
        "force": float(hessian_vector(D, velocity).norm()),
        "gradient": float(D.mean_gradient().norm()),
    }
