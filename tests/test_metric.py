"""DiffusionMetric against dense matrices: g, the Woodbury inverse, the weak field, ε rule."""

from __future__ import annotations

import pytest
import torch

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon
from sgdgeom.errors import InputError
from sgdgeom.metric import DiffusionMetric
from sgdgeom.persample import per_sample_loss
from tests.cases import CASE_NAMES, make_case
from tests.reference import assert_close, dense_diffusion, per_sample_gradients


@pytest.fixture(params=CASE_NAMES)
def setup(request):
    case = make_case(request.param)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    return D, dense_diffusion(G), G.mean(0)


def test_apply_solve_and_gradient_equal_dense(setup):
    D, D_ref, g_bar = setup
    lam = float(torch.linalg.eigvalsh(D_ref)[-1])
    metric = DiffusionMetric(D, eps=0.7 / lam)
    eye = torch.eye(len(D_ref), dtype=torch.float64)
    g_dense = eye + metric.eps * D_ref
    v = torch.randn(len(D_ref), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_close(metric.apply(v), g_dense @ v, what="g v")
    assert_close(metric.solve(v), torch.linalg.solve(g_dense, v), what="Woodbury g⁻¹ v")
    assert_close(metric.solve(v, "weak"), (eye - metric.eps * D_ref) @ v, what="weak")
    assert_close(metric.gradient(), torch.linalg.solve(g_dense, g_bar), what="∇_D f")
    assert_close(
        metric.gradient("weak"), (eye - metric.eps * D_ref) @ g_bar, what="weak ∇_D f (F10)"
    )


@pytest.mark.parametrize("eps", ["auto", "fixed"])
def test_matrix_free_route_equals_dense_without_a_gram_matrix(setup, eps, monkeypatch):
    """λ_max by Lanczos on the operator K, the exact solve by conjugate gradients and
    c = G ḡ by a JVP: the same metric as the dense one, and K is never formed."""
    D, D_ref, g_bar = setup
    monkeypatch.setattr(type(D), "gram", lambda self: pytest.fail("the Gram matrix was formed"))
    lam = float(torch.linalg.eigvalsh(D_ref)[-1])
    metric = DiffusionMetric(
        D, eps="auto" if eps == "auto" else 0.3 / D.trace(), eps_fraction=0.7, matrix_free=True
    )
    if eps == "auto":
        assert metric.lambda_max == pytest.approx(lam, rel=1e-9)
        assert metric.eps == pytest.approx(0.7 / lam, rel=1e-9)
    eye = torch.eye(len(D_ref), dtype=torch.float64)
    g_dense = eye + metric.eps * D_ref
    v = torch.randn(len(D_ref), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_close(metric.solve(v), torch.linalg.solve(g_dense, v), what="CG g⁻¹ v")
    assert_close(metric.gradient(), torch.linalg.solve(g_dense, g_bar), what="CG ∇_D f")
    assert 1 <= metric.cg_steps <= 30
    assert_close(metric.gradient("weak"), (eye - metric.eps * D_ref) @ g_bar, what="weak ∇_D f")
    assert "_gram" not in D.__dict__


def test_weak_field_bound_holds_and_is_attained(setup):
    D, D_ref, _ = setup
    metric = DiffusionMetric(D, eps="auto", eps_fraction=0.9)
    bound = metric.weak_field_bound()
    eye = torch.eye(len(D_ref), dtype=torch.float64)
    difference = torch.linalg.inv(eye + metric.eps * D_ref) - (eye - metric.eps * D_ref)
    assert float(torch.linalg.matrix_norm(difference, ord=2)) == pytest.approx(bound, rel=1e-8)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        v = torch.randn(len(D_ref), dtype=torch.float64, generator=g)
        assert metric.weak_field_error(v) <= bound * float(v.norm()) * (1 + 1e-10)
    _, top = D.eigh(1)
    assert metric.weak_field_error(top[:, 0]) == pytest.approx(bound, rel=1e-6)


def test_eps_rule(setup):
    D, D_ref, _ = setup
    lam = float(torch.linalg.eigvalsh(D_ref)[-1])
    assert DiffusionMetric(D, eps="auto").eps == pytest.approx(0.5 / lam, rel=1e-9)
    metric = DiffusionMetric(D, eps="auto", eps_fraction=0.25)
    assert metric.eps == pytest.approx(0.25 / lam, rel=1e-9)
    with pytest.raises(ValueError, match="at or above 1/λ_max"):  # at 1/λ, up to rounding
        DiffusionMetric(D, eps=(1.0 + 1e-12) / lam)
    with pytest.raises(ValueError, match="at or above 1/λ_max"):
        DiffusionMetric(D, eps=3.0 / lam)
    with pytest.raises(ValueError, match="eps_fraction"):
        DiffusionMetric(D, eps_fraction=1.0)


def resolve_eps(eps, fraction, lambda_max):
    return Epsilon.parse(eps, fraction).resolve(lambda_max)


def test_resolve_eps_edge_cases():
    assert resolve_eps("auto", 0.5, 0.0) == 0.0  # D = 0: the metric is the identity
    assert resolve_eps(0.1, 0.5, 0.0) == 0.1
    with pytest.raises(ValueError, match="'auto' or a number"):
        resolve_eps("big", 0.5, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_eps(-1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_eps(float("nan"), 0.5, 1.0)


def test_matmul_takes_vectors_matrices_and_dicts_and_refuses_another_dtype():
    case = make_case("mlp-relu")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    metric = DiffusionMetric(D, eps="auto")
    V = torch.randn(D.space.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_dense = torch.eye(D.space.dim, dtype=torch.float64) + metric.eps * D.dense()
    assert_close(metric @ V, g_dense @ V, what="g @ V")
    assert_close(metric @ V[:, 0], g_dense @ V[:, 0], what="g @ v")
    as_dict = metric @ D.space.unflatten(V[:, 1])
    assert_close(D.space.flatten(as_dict), g_dense @ V[:, 1], what="g @ dict")
    with pytest.raises(InputError, match=r"v is float32 on cpu, but .* float64 on cpu: pass v.to"):
        D @ V[:, 0].float()
    with pytest.raises(InputError, match=r"v is float32 .* pass v.to"):
        metric.solve(V[:, 0].float())
    with pytest.raises(InputError, match=rf"v must be a \({D.space.dim},\) tensor, got \(5,\)"):
        D @ torch.zeros(5, dtype=torch.float64)
