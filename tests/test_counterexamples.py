"""Analytic counterexamples to the reduction (F8) → (F10) and to "(F9) ⇒ ∇·D = 0".

Per-sample quadratics ``f_i(x) = ½ s_i ‖x‖² + b_iᵀx`` (16 samples, d = 3): every third
derivative vanishes, the condition the paper gives for (F9). ``docs/geometry.md`` (e)
states what these tests show, with the numbers of :func:`counterexample_numbers`.

- Equal curvatures ``s_i = s``: D = Cov(b) is constant, so every Christoffel symbol
  vanishes and the geodesic (F8) is ``ẍ = −s ẋ``: gradient descent plus a constant
  velocity, ``ẋ + ∇f(x) = (I − g⁻¹)∇f(x₀)``, in closed form. The metric flow (F10) is
  another curve. The paper's step ``Σ_ij ∂_i∂_j f̂ ẋ^i ẋ^j = d²f̂/dt²`` drops ``∇f̂ · ẍ``;
  kept, it adds ``ε D ẍ`` to the geodesic's left side, the very term that turns it into
  (F10).
- Unequal curvatures: (F9)'s condition still holds, yet
  ``∇·D = (d + 1)(Var(s) x + Cov(s, b)) ≠ 0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.geometry import christoffel, geodesic, metric_flow
from sgdgeom.metric import DiffusionMetric
from tests.test_geometry import ScaledSpheres

N, DIM, EPS_FRACTION = 16, 3, 0.5
START = np.array([1.5, -1.0, 0.8])


def problem(equal: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    s = np.full(N, 1.0) if equal else gen.uniform(0.5, 1.5, N)
    return s, gen.normal(size=(N, DIM))


def setup(s: np.ndarray, b: np.ndarray, start: np.ndarray = START):
    model = ScaledSpheres(start.tolist())
    data = (torch.tensor(np.column_stack([s, b])), torch.zeros(N))
    return model, data


def own_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return out


def matrix(model, data) -> DiffusionMatrix:
    return DiffusionMatrix(model, own_loss, data, route="generic", chunk_size=None)


@pytest.fixture(scope="module")
def equal_curvatures():
    """The equal-curvature problem, its D, ε, and the geodesic and metric flow from x₀."""
    s, b = problem(equal=True)
    model, data = setup(s, b)
    D = matrix(model, data)
    eps = EPS_FRACTION / D.lambda_max()
    metric = DiffusionMetric(D, eps)
    gradient0, v0 = D.mean_gradient(), -metric.gradient("exact")
    t = np.linspace(0.0, 4.0, 5)
    x0 = torch.tensor(START)
    ours = geodesic(model, own_loss, data, x0, t, eps, rtol=1e-10, atol=1e-12)
    flow = metric_flow(model, own_loss, data, x0, t, eps, rtol=1e-10, atol=1e-12)
    return s, b, model, data, D, eps, gradient0, v0, t, ours, flow


def test_equal_curvatures_have_no_christoffel_symbols_and_the_geodesic_is_gd_plus_a_constant(
    equal_curvatures,
):
    s, b, model, data, _, eps, gradient0, v0, t, ours, _ = equal_curvatures
    assert christoffel(model, own_loss, data, eps).abs().max() < 1e-14
    decay = np.exp(-s[0] * t)[:, None]
    np.testing.assert_allclose(ours.v, decay * v0.numpy(), atol=1e-8)  # ẍ = −s ẋ, solved
    np.testing.assert_allclose(ours.x, START + (1 - decay) / s[0] * v0.numpy(), atol=1e-8)
    gradient_along = s[0] * ours.x + b.mean(0)
    constant = (gradient0 + v0).numpy()  # (I − g⁻¹)∇f(x₀)
    np.testing.assert_allclose(ours.v + gradient_along, np.tile(constant, (len(t), 1)), atol=1e-8)
    assert np.linalg.norm(constant) > 0.05 * float(gradient0.norm())


def test_equal_curvatures_the_metric_flow_is_another_curve_and_the_dropped_term_is_eps_d_xddot(
    equal_curvatures,
):
    s, b, _, _, D, eps, _, _, t, ours, flow = equal_curvatures
    dense = D.dense().numpy()
    g = np.eye(DIM) + eps * dense
    centre = -b.mean(0) / s[0]  # the minimum of f
    closed = np.stack([centre + expm(-s[0] * tk * np.linalg.inv(g)) @ (START - centre) for tk in t])
    np.testing.assert_allclose(flow.x, closed, atol=1e-7)  # (F10), solved
    gap = np.linalg.norm(ours.x - flow.x, axis=1)
    assert gap[0] == 0 and gap.max() > 0.05 * np.linalg.norm(START - centre)
    # (F10) solves g ẍ = −H ẋ: the geodesic's ẍ = −H ẋ plus the term −ε D ẍ; along the
    # geodesic that term is as large as the metric's own correction to the velocity
    xddot = ours.a[0]
    assert np.linalg.norm(eps * dense @ xddot) > 0.05 * np.linalg.norm(xddot)
    np.testing.assert_allclose(xddot, -s[0] * ours.v[0], atol=1e-10)


def test_unequal_curvatures_keep_f9s_condition_but_the_divergence_is_not_zero():
    s, b = problem(equal=False)
    model, data = setup(s, b)
    D = matrix(model, data)
    variance = s.var()
    covariance = ((s - s.mean())[:, None] * (b - b.mean(0))).mean(0)
    expected = (DIM + 1) * (variance * START + covariance)
    divergence = D.divergence(probes=None).value.numpy()
    np.testing.assert_allclose(divergence, expected, atol=1e-12)
    gradient = D.mean_gradient().numpy()
    assert np.linalg.norm(divergence) > 0.05 * np.linalg.norm(gradient)


@pytest.mark.parametrize("equal", [True, False])
def test_the_third_derivatives_vanish(equal):
    """(F9)'s condition, by autograd on the model itself: ∂³f_i = 0."""
    s, b = problem(equal)
    x = torch.tensor(START, requires_grad=True)

    def f(point):
        return (0.5 * torch.tensor(s) * (point**2).sum() + torch.tensor(b) @ point).sum()

    third = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.hessian(f, p, create_graph=True), x
    )
    assert third.abs().max() == 0


def counterexample_numbers() -> dict[str, float]:
    """The numbers ``docs/geometry.md`` (e) quotes, from the problems above."""
    s, b = problem(equal=True)
    model, data = setup(s, b)
    D = matrix(model, data)
    eps = EPS_FRACTION / D.lambda_max()
    t = np.linspace(0.0, 4.0, 41)
    ours = geodesic(model, own_loss, data, torch.tensor(START), t, eps, rtol=1e-10, atol=1e-12)
    flow = metric_flow(model, own_loss, data, torch.tensor(START), t, eps, rtol=1e-10, atol=1e-12)
    centre = -b.mean(0) / s[0]
    gap = np.linalg.norm(ours.x - flow.x, axis=1).max() / np.linalg.norm(START - centre)
    xddot = ours.a[0]
    dropped = np.linalg.norm(eps * D.dense().numpy() @ xddot) / np.linalg.norm(xddot)
    s2, b2 = problem(equal=False)
    model2, data2 = setup(s2, b2)
    D2 = matrix(model2, data2)
    ratio = float(D2.divergence(probes=None).value.norm() / D2.mean_gradient().norm())
    return {"gap_over_distance": gap, "eps_d_xddot_over_xddot": dropped, "div_over_grad": ratio}


if __name__ == "__main__":
    print(counterexample_numbers())
