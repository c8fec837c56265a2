r"""Christoffel symbols of the diffusion metric, its geodesics and flows (Fioresi et al.,
eq. 4-10; DESIGN §1).

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
size. The geodesic equation is (F8) with the sign of DESIGN §1,
:math:`\ddot x + \Gamma(\dot x, \dot x) = -H \dot x`.

Points ``x`` are flat parameter vectors (:class:`~sgdgeom.params.ParamSpace` order). The
model's parameters are set to ``x`` for each evaluation (the model is modified in place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.metric import DiffusionMetric
from sgdgeom.params import ParamSpace
from sgdgeom.persample import LossSpec, check_independent_samples, per_sample_loss

__all__ = [
    "Curl",
    "Current",
    "Trajectory",
    "chaudhari_soatto_sde",
    "christoffel",
    "christoffel_contract",
    "current",
    "curl",
    "metric_gradient_field",
    "per_sample_gradient_function",
    "geodesic",
    "gradient_flow",
    "metric_flow",
    "RESIDUAL_LEVELS",
    "residuals",
    "set_parameters",
    "sgd_ensemble",
]

DENSE_LIMIT = 256  # christoffel() forms a d x d x d tensor


def set_parameters(model: nn.Module, x: Tensor) -> None:
    """Load the flat vector ``x`` into the model's trainable parameters."""
    space = ParamSpace(model)
    with torch.no_grad():
        for p, value in zip(space.params(model).values(), space.unflatten(x).values(), strict=True):
            p.copy_(value)


def christoffel(
    model: nn.Module, loss_fn: LossSpec, data: tuple[Tensor, Tensor], eps: float, exact: bool = True
) -> Tensor:
    """The dense Christoffel symbols ``Γ[w, u, v]`` (``d x d x d``) of ``g = I + εD`` at the
    model's parameters, from explicit per-sample gradients and Hessians (tiny models)."""
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
    if not exact:
        return eps * cov
    D = (G - G.mean(0)).T @ (G - G.mean(0)) / n
    g_inv = torch.linalg.inv(torch.eye(space.dim, dtype=D.dtype) + eps * D)
    return eps * torch.einsum("wz,zuv->wuv", g_inv, cov)


def _matrix(model: nn.Module, loss_fn: LossSpec, data: tuple[Tensor, Tensor]) -> DiffusionMatrix:
    return DiffusionMatrix(model, loss_fn, data, route="generic", chunk_size=None)


def christoffel_contract(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    eps: float,
    xdot: Tensor,
    exact: bool = True,
    D: DiffusionMatrix | None = None,
) -> Tensor:
    """``Γ(ẋ, ẋ)`` matrix-free: ``ε Cov_i(ẋᵀH_iẋ, g_i)``, with ``g⁻¹`` applied if exact."""
    D = D if D is not None else _matrix(model, loss_fn, data)
    q = D.products.second_directional(xdot)
    weak = eps * D.products.vjp(q - q.mean()) / D.n
    return DiffusionMetric(D, eps).solve(weak) if exact else weak


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
    return value.item(), space.flatten([p.grad for p in space.params(model).values()])


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
    exact: bool = True,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "RK45",
) -> Trajectory:
    """The metric-gradient flow (F10): ``ẋ = −g⁻¹∇f`` (exact) or ``−(I − εD)∇f`` (weak)."""

    def velocity() -> Tensor:
        return -DiffusionMetric(_matrix(model, loss_fn, data), eps).gradient(exact=exact)

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
        f"metric-{'exact' if exact else 'weak'}",
    )


def geodesic(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    x0: Tensor,
    t: np.ndarray,
    eps: float,
    *,
    exact: bool = True,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "RK45",
) -> Trajectory:
    """The geodesic equation (F8) with DESIGN §1's sign, ``ẍ + Γ(ẋ, ẋ) = −H ẋ``, from
    ``x(0) = x0`` and ``ẋ(0) = −g⁻¹∇f(x0)``; ``Γ`` exact or weak-field (F7)."""
    dtype, d = x0.dtype, len(x0)
    set_parameters(model, x0)
    v0 = -DiffusionMetric(_matrix(model, loss_fn, data), eps).gradient(exact=True)

    def acceleration(x: Tensor, v: Tensor) -> Tensor:
        set_parameters(model, x)
        D = _matrix(model, loss_fn, data)
        gamma = christoffel_contract(model, loss_fn, data, eps, v, exact=exact, D=D)
        return -gamma - _hessian_vector(D, v)

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
        {"flow": f"geodesic-{'exact' if exact else 'weak'}", "nfev": result.nfev},
        accelerations,
    )


def _hessian_vector(D: DiffusionMatrix, v: Tensor) -> Tensor:
    """``H v`` of the mean loss, ``(1/N) Σ_i H_i v``, forward-over-reverse."""
    weights = torch.full((D.n,), 1.0 / D.n, dtype=v.dtype, device=v.device)
    return D.products.hessian_vector(v, weights)


# --------------------------------------------------------------------------- steady state


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
    eps: float | str = "auto",
    *,
    exact: bool = True,
    probes: int | None = None,
    seed: int = 0,
) -> Current:
    """The current ``j(x)`` of Fioresi et al. (F12) at D's point, with ``∇Φ = ∇_D f`` (F11).

    ``j = −∇f + D̃ ∇_D f − β⁻¹ ∇·D̃`` with ``D̃ = g = I + εD``. With the exact metric
    gradient ``D̃ ∇_D f = ∇f``, so ``j = −(ε/β) ∇·D``; the weak field
    (``exact=False``, ``∇_D f ≈ (I − εD)∇f``) leaves ``−ε² D² ∇f`` besides. The paper
    argues ``∇·D̃ = 0`` under (F9), hence ``j = 0``; :attr:`Current.ratio` measures how far
    that holds. ``probes``: Hutchinson probes for ``∇·D`` (None: exact, small models).
    """
    if not beta > 0:
        raise InputError(f"beta must be > 0, got {beta}")
    metric = DiffusionMetric(D, eps=eps)
    gradient = D.mean_gradient()
    divergence = D.divergence(probes=probes, seed=seed)
    scale = metric.eps / beta
    term = scale * divergence.value
    j = -gradient + metric.apply(metric.gradient(exact=exact)) - term
    norm = float(gradient.norm())
    ratio = float(term.norm()) / norm if norm > 0 else float("inf")
    stderr = scale * divergence.stderr if divergence.stderr is not None else None
    return Current(j, term, ratio, metric.eps, stderr)


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


# --------------------------------------------------------------------------- residuals


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
    D = _matrix(model, loss_fn, data)
    products = D.products
    losses = products.losses()
    w = (losses - losses.mean()) / D.n  # (1/N) Σ_i (f_i − f̄) ∇ s_i = Cov_i(f_i, ∇ s_i)
    velocity, acceleration = (torch.as_tensor(t, dtype=dtype) for t in (v, a))
    return {
        "third_derivative": eps * float(products.third_directional(velocity, w).norm()),
        "hessian_acceleration": eps * float(products.hessian_vector(acceleration, w).norm()),
        "eps_over_n2": eps * float(products.hessian_vector(velocity, w).norm()),
        "d_xddot": eps * float(D.matvec(acceleration).norm()),
        "force": float(_hessian_vector(D, velocity).norm()),
        "gradient": float(D.mean_gradient().norm()),
    }


# --------------------------------------------------------------------------- stochastic


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
