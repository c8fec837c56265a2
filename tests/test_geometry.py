"""Christoffel symbols against autograd of the metric, the contraction, and D = 0 → GD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.geometry import (
    RESIDUAL_LEVELS,
    chaudhari_soatto_sde,
    christoffel,
    christoffel_contract,
    curl,
    current,
    geodesic,
    gradient_flow,
    metric_flow,
    metric_gradient_field,
    residuals,
    sgd_ensemble,
)
from sgdgeom.metric import DiffusionMetric
from sgdgeom.params import ParamSpace
from sgdgeom.persample import per_sample_loss
from tests.reference import (
    assert_close,
    dense_diffusion,
    dense_divergence,
    per_sample_gradients,
)


def tiny(seed=0, n=7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return model, (x, y)


def metric_of(model, data, eps):
    """g(x) = I + εD(x) as a differentiable function of the flat parameters."""
    space = ParamSpace(model)
    loss = per_sample_loss("cross_entropy")
    x, y = data

    def g(flat):
        params = dict(zip(space.names, space.unflatten(flat).values(), strict=True))
        rows = []
        for i in range(len(x)):
            value = loss(torch.func.functional_call(model, params, (x[i : i + 1],)), y[i : i + 1])
            rows.append(torch.autograd.grad(value.sum(), flat, create_graph=True)[0])
        G = torch.stack(rows)
        centred = G - G.mean(0)
        return torch.eye(len(flat), dtype=flat.dtype) + eps * centred.T @ centred / len(x)

    return g, space.vector(model)


def test_christoffel_equals_the_definition_from_autograd_of_g():
    model, data = tiny()
    eps = 0.3
    g, x0 = metric_of(model, data, eps)
    x0 = x0.clone().requires_grad_(True)
    dg = torch.autograd.functional.jacobian(g, x0)  # dg[v, z, u] = ∂_u g_vz
    metric = g(x0).detach()
    # (F5): Γ^w_uv = ½ g^{wz} (∂_u g_vz + ∂_v g_uz − ∂_z g_uv)
    # bracket[u, v, z] = ∂_u g_vz + ∂_v g_uz − ∂_z g_uv
    bracket = dg.permute(2, 0, 1) + dg.permute(0, 2, 1) - dg
    reference = 0.5 * torch.einsum("wz,uvz->wuv", torch.linalg.inv(metric), bracket)
    assert_close(
        christoffel(model, "cross_entropy", data, eps, "exact"),
        reference,
        atol=1e-10,
        what="exact Γ",
    )
    weak = 0.5 * bracket.permute(2, 0, 1)  # ε-linear part: δ^{wz} instead of g^{wz}
    assert_close(
        christoffel(model, "cross_entropy", data, eps, "weak"),
        weak,
        atol=1e-10,
        what="weak-field Γ (F7)",
    )


def test_contraction_equals_the_dense_tensor():
    model, data = tiny(seed=3)
    eps = 0.2
    xdot = torch.randn(
        sum(p.numel() for p in model.parameters()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(4),
    )
    for inverse in ("exact", "weak"):
        dense = christoffel(model, "cross_entropy", data, eps, inverse)
        expected = torch.einsum("wuv,u,v->w", dense, xdot, xdot)
        assert_close(
            christoffel_contract(model, "cross_entropy", data, eps, xdot, inverse),
            expected,
            atol=1e-12,
            what=f"Γ(ẋ, ẋ) inverse={inverse}",
        )


def test_with_zero_diffusion_the_geodesic_and_metric_flow_are_gd():
    model, (x, y) = tiny(seed=5)
    data = (x[:1].repeat(5, 1), y[:1].repeat(5))  # identical samples: D = 0
    x0 = ParamSpace(model).vector(model)
    t = np.linspace(0, 2, 5)
    gd = gradient_flow(model, "cross_entropy", data, x0, t)
    flow = metric_flow(model, "cross_entropy", data, x0, t, eps=0.5)
    geo = geodesic(model, "cross_entropy", data, x0, t, eps=0.5)
    np.testing.assert_allclose(flow.x, gd.x, atol=1e-7)
    np.testing.assert_allclose(geo.x, gd.x, atol=1e-6)
    assert gd.f[-1] < gd.f[0]


def quadratic_model(seed=0):
    """Per-sample losses quadratic in the parameters (third derivatives zero): a linear
    model with the squared error."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(9, 3, dtype=torch.float64, generator=g)
    y = torch.randn(9, 2, dtype=torch.float64, generator=g)
    return model, (x, y)


def test_f9_residual_vanishes_for_quadratic_losses_but_not_for_a_network():
    model, data = quadratic_model()
    x0 = ParamSpace(model).vector(model)
    t = np.linspace(0, 1, 9)
    path = geodesic(model, "mse", data, x0, t, eps=0.1)
    res = residuals(model, "mse", data, path, eps=0.1)
    assert np.max(res["third_derivative"]) < 1e-12
    assert np.min(res["force"]) > 1e-3 and np.min(res["gradient"]) > 1e-3  # kept terms
    assert np.max(res["eps_over_n2"]) > 1e-6 and np.max(res["d_xddot"]) > 1e-8
    assert set(RESIDUAL_LEVELS) | {"force", "gradient"} == set(res)
    net, net_data = tiny(seed=2)
    x0 = ParamSpace(net).vector(net)
    path = geodesic(net, "cross_entropy", net_data, x0, t, eps=0.1)
    assert (
        np.max(residuals(net, "cross_entropy", net_data, path, eps=0.1)["third_derivative"]) > 1e-6
    )
    with pytest.raises(InputError, match="accelerations"):
        residuals(model, "mse", data, metric_flow(model, "mse", data, x0[:8], t, eps=0.1), 0.1)


def test_geodesic_accelerations_are_the_derivative_of_its_velocities():
    """The stored ẍ (the equation's right-hand side) against a finite difference of the
    stored velocities on a fine grid: an independent check of both."""
    net, net_data = tiny(seed=2)
    x0 = ParamSpace(net).vector(net)
    t = np.linspace(0, 0.5, 201)
    path = geodesic(net, "cross_entropy", net_data, x0, t, eps=0.1, rtol=1e-11, atol=1e-13)
    finite = np.gradient(path.v, t, axis=0, edge_order=2)
    scale = np.abs(path.a).max()
    assert scale > 1e-3
    np.testing.assert_allclose(path.a[5:-5], finite[5:-5], atol=1e-5 * scale)


def test_sgd_ensemble_and_sde_statistics():
    model, data = quadratic_model(seed=4)
    x0 = ParamSpace(model).vector(model)
    ens = sgd_ensemble(
        model,
        "mse",
        data,
        x0,
        lr=0.05,
        batch_size=3,
        steps=20,
        runs=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert ens["mean"].shape == (21, len(x0)) and ens["cov"].shape == (21, len(x0), len(x0))
    assert np.allclose(ens["cov"][0], 0)  # all runs start at x0
    assert np.trace(ens["cov"][-1]) > 0  # minibatch noise spreads them
    sde = chaudhari_soatto_sde(
        model,
        "mse",
        data,
        x0,
        lr=0.05,
        batch_size=3,
        t_end=1.0,
        dt=0.05,
        paths=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert sde["mean"].shape == (21, len(x0))
    gd = gradient_flow(model, "mse", data, x0, np.array([0.0, 1.0]))
    spread = np.linalg.norm(sde["iterates"][:, -1] - sde["mean"][-1], axis=1).mean()
    assert np.linalg.norm(sde["mean"][-1] - gd.x[-1]) < 3 * spread + 1e-3


def test_two_layer_experiment_writes_table_and_plots(tmp_path):
    from sgdgeom.experiments.geodesic import GeodesicConfig, run_geodesic

    config = GeodesicConfig(
        name="t",
        n=12,
        hidden=2,
        runs=2,
        batch_size=4,
        lr=0.1,
        t_end=0.4,
        points=3,
        eps_fractions=[0.3],
        residual_points=3,
    )
    result = run_geodesic(config, tmp_path)
    models = {row["model"] for row in result["tracking_table"]}
    assert {"gd", "metric-exact ε=0.3/λ", "geodesic-weak ε=0.3/λ", "SDE mean"} <= models
    assert result["distances"]["gd"][0] == 0.0  # every model starts at the SGD mean
    steady = result["current"]
    assert len(steady["ratio"]) == len(steady["t"]) == 3
    assert all(r > 0 for r in steady["ratio"]) and all(c >= 0 for c in steady["curl"])
    assert steady["beta"] == 2 * config.batch_size / config.lr
    assert (tmp_path / "distances.png").is_file() and (tmp_path / "residuals.png").is_file()


def test_plane_quadratic_curl_matches_the_closed_form(tmp_path):
    """For f_i = ½(x−ξ_i)ᵀA(x−ξ_i), D = A Cov(ξ) A is constant, so ∇_D f = M (x − ξ̄) with
    M = (I + εD)⁻¹A and its curl is M₂₁ − M₁₂ everywhere: non-zero when the noise is tilted
    (Chaudhari-Soatto's non-conservative part), although f itself is a gradient field."""
    from sgdgeom.experiments.plane import make_problem, run_plane

    result = run_plane("quadratic", tmp_path, n=16, t_end=0.2, lr=0.05, runs=4, grid=4)
    _, (centres, _) = make_problem("quadratic", 16)
    A = np.diag([1.0, 4.0])
    c = centres.numpy()
    D = A @ ((c - c.mean(0)).T @ (c - c.mean(0)) / len(c)) @ A
    M = np.linalg.solve(np.eye(2) + result["eps"] * D, A)
    np.testing.assert_allclose(result["curl"], M[1, 0] - M[0, 1], rtol=1e-12)
    assert result["curl_max"] > 1e-3
    assert max(result["current_ratio"]) < 1e-12  # D constant: ∇·D = 0, j = 0 (F12)
    aligned = run_plane("aligned", tmp_path, n=16, t_end=0.2, lr=0.05, runs=4, grid=4)
    assert aligned["curl_max"] < 1e-14  # D commutes with A: ∇_D f = ∇Φ (F11)
    assert np.allclose(result["long_run"]["minimum_of_f"], c.mean(0), atol=1e-6)
    assert (tmp_path / "plane-quadratic.png").is_file()


@pytest.mark.parametrize("exact", [True, False])
def test_current_of_f12_against_dense_matrices(exact):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))
    loss = per_sample_loss("cross_entropy")
    G = per_sample_gradients(model, loss, x, y)
    D_dense, g_bar = dense_diffusion(G), G.mean(0)
    divergence = dense_divergence(model, loss, x, y)
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route="generic")
    beta = 50.0
    result = current(D, beta, eps="auto", inverse="exact" if exact else "weak")
    eye = torch.eye(len(g_bar), dtype=torch.float64)
    metric = eye + result.eps * D_dense
    metric_gradient = (
        torch.linalg.solve(metric, g_bar) if exact else (eye - result.eps * D_dense) @ g_bar
    )
    expected = -g_bar + metric @ metric_gradient - result.eps / beta * divergence
    assert_close(result.j, expected, rtol=1e-9, atol=1e-12, what="j of (F12)")
    assert_close(result.divergence_term, result.eps / beta * divergence, what="β⁻¹∇·D̃")
    ratio = float((result.eps / beta * divergence).norm() / g_bar.norm())
    assert result.ratio == pytest.approx(ratio, rel=1e-9)
    if exact:  # D̃ ∇_D f = ∇f: only the divergence is left
        assert_close(result.j, -result.eps / beta * divergence, rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="beta must be > 0"):
        current(D, 0.0)


def _field_fd(field, point, direction, h=1e-5):
    return (field(point + h * direction) - field(point - h * direction)) / (2 * h)


@pytest.mark.parametrize("kind", ["quadratic", "rosenbrock"])
def test_curl_on_the_plane_is_exact_against_finite_differences(kind):
    from sgdgeom.experiments.plane import identity_loss, make_problem

    model, data = make_problem(kind, n=16)
    point = ParamSpace(model).vector(model).detach()
    D = DiffusionMatrix(model, identity_loss, data, route="generic")
    eps = 0.5 / D.lambda_max()
    field = metric_gradient_field(model, identity_loss, data, eps)
    assert_close(field(point), DiffusionMetric(D, eps).gradient("exact"), what="∇_D f")
    result = curl(model, identity_loss, data, eps)
    e1, e2 = torch.eye(2, dtype=torch.float64)
    expected = _field_fd(field, point, e1)[1] - _field_fd(field, point, e2)[0]  # ∂₁F₂ − ∂₂F₁
    assert result.values.shape == (1,)
    assert float(result.values[0]) == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    assert abs(float(expected)) > 1e-4  # ∇_D f is not a gradient field here


def test_curl_in_random_sections_vanishes_only_for_a_gradient_field():
    model, data = tiny(seed=3)
    point = ParamSpace(model).vector(model).detach()
    flat = curl(model, "cross_entropy", data, eps=0.0, sections=4)
    assert float(flat.values.abs().max()) < 1e-12  # ε = 0: ∇f, whose Jacobian is symmetric
    D = DiffusionMatrix(model, "cross_entropy", data, route="generic")
    eps = 0.5 / D.lambda_max()
    result = curl(model, "cross_entropy", data, eps=eps, sections=4, seed=2)
    field = metric_gradient_field(model, "cross_entropy", data, eps)
    for (u, v), value in zip(result.sections, result.values, strict=True):
        expected = v @ _field_fd(field, point, u) - u @ _field_fd(field, point, v)
        assert float(value) == pytest.approx(float(expected), rel=1e-5, abs=1e-10)
        assert torch.allclose(u @ v, torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert float(result.relative.max()) > 1e-6


@pytest.mark.parametrize("name", ["partly-frozen", "tied-autoencoder"])
def test_metric_gradient_field_on_unusual_models(name):
    from tests.cases import make_case

    case = make_case(name)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route="generic")
    eps = 0.5 / D.lambda_max()
    field = metric_gradient_field(case.model, case.loss, (case.x, case.y), eps)
    point = ParamSpace(case.model).vector(case.model).detach()
    assert_close(field(point), DiffusionMetric(D, eps).gradient("exact"), what=name)


def _quadratic_plane(seed=0, n=16):
    """The plane quadratic ``f_i = ½ (x − ξ_i)ᵀ A (x − ξ_i)``, ``A = diag(1, 4)``: its
    per-sample gradients ``A (x − ξ_i)`` have the constant covariance ``D = A C A`` (``C``
    the population covariance of the centres), derived here by hand."""
    from sgdgeom.experiments.plane import identity_loss, make_problem

    model, data = make_problem("quadratic", n=n, seed=seed)
    A = np.diag([1.0, 4.0])
    centres = data[0].numpy()
    C = np.cov(centres.T, bias=True)
    return model, data, identity_loss, A, centres.mean(0), A @ C @ A


def _stationary_check(iterates, mean, cov):
    """Every path's last state is an independent draw: its sample mean and covariance
    against the reference, within 4 standard errors of each entry."""
    last = iterates[:, -1]
    paths = len(last)
    sample_cov = np.cov(last.T)
    se_mean = np.sqrt(np.diag(cov) / paths)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / paths)
    assert np.all(np.abs(last.mean(0) - mean) < 4 * se_mean)
    assert np.all(np.abs(sample_cov - cov) < 4 * se_cov)
    return sample_cov, se_cov


def test_sde_stationary_covariance_solves_the_lyapunov_equation():
    """Chaudhari–Soatto SDE on a quadratic with constant D: the stationary covariance Σ of
    ``dx = −A(x − ξ̄) dt + √(2T D) dW`` solves ``AΣ + ΣA = 2TD`` (continuous Lyapunov);
    Euler–Maruyama with step dt solves ``Σ = (I − dt A) Σ (I − dt A) + 2T D dt``
    exactly. Both references come from scipy, not from the library."""
    from scipy.linalg import solve_continuous_lyapunov, solve_discrete_lyapunov

    model, data, loss, A, centre, D = _quadratic_plane()
    lr, batch, dt = 0.2, 2, 0.01
    temperature = lr / (2 * batch)
    sde = chaudhari_soatto_sde(
        model,
        loss,
        data,
        torch.tensor(centre + np.array([0.3, -0.2])),
        lr=lr,
        batch_size=batch,
        t_end=6.0,  # 6 relaxation times of the slow direction
        dt=dt,
        paths=3000,
        every=600,
        generator=torch.Generator().manual_seed(1),
    )
    step = np.eye(2) - dt * A
    discrete = solve_discrete_lyapunov(step, 2 * temperature * D * dt)
    sample_cov, se_cov = _stationary_check(sde["iterates"], centre, discrete)
    continuous = solve_continuous_lyapunov(A, 2 * temperature * D)
    assert np.abs(continuous - discrete).max() < 0.03 * np.abs(continuous).max()  # O(dt)
    assert np.all(np.abs(sample_cov - continuous) < 4 * se_cov + np.abs(continuous - discrete))
    isotropic = solve_continuous_lyapunov(A, 2 * temperature * np.trace(D) / 2 * np.eye(2))
    assert np.abs(sample_cov - isotropic).max() > 10 * se_cov.max()  # it sees D's shape


def test_sgd_stationary_covariance_solves_its_discrete_lyapunov_equation():
    """SGD on the same quadratic: minibatch noise of covariance D/b whatever x, so the
    iterates' stationary covariance solves ``Σ = (I − ηA) Σ (I − ηA) + η² D / b``."""
    from scipy.linalg import solve_discrete_lyapunov

    model, data, loss, A, centre, D = _quadratic_plane(seed=3)
    lr, batch = 0.1, 3
    ensemble = sgd_ensemble(
        model,
        loss,
        data,
        torch.tensor(centre),
        lr=lr,
        batch_size=batch,
        steps=150,
        runs=3000,
        every=150,
        generator=torch.Generator().manual_seed(2),
    )
    assert ensemble["iterates"].shape == (3000, 2, 2)
    reference = solve_discrete_lyapunov(np.eye(2) - lr * A, lr**2 * D / batch)
    _stationary_check(ensemble["iterates"], centre, reference)


class ScaledSpheres(nn.Module):
    """``f_i(x) = ½ s_i ‖x‖² + b_iᵀx``, the per-sample constants ``(s_i, b_i)`` as inputs:
    ``D(x)`` varies with x (its Christoffel symbols do not vanish) yet every derivative is
    derived by hand in :func:`hand_geodesic_rhs`."""

    def __init__(self, start):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, constants):
        s, b = constants[:, 0], constants[:, 1:]
        return 0.5 * s * (self.x**2).sum() + b @ self.x


def hand_geodesic_rhs(s, b, eps, exact):
    """The geodesic equation (F8) ``ẍ = −Γ(ẋ, ẋ) − H ẋ`` of ``g = I + εD`` from the
    definition ``Γ_zuv = ½ (∂_u g_zv + ∂_v g_zu − ∂_z g_uv)``, with D and ∂D by hand:
    ``g_i = s_i x + b_i``, so ``D = V x xᵀ + x cᵀ + c xᵀ + B`` (``V = Var s``,
    ``c = Cov(s, b)``, ``B = Cov b``) and
    ``∂_u D_vz = V (δ_uv x_z + x_v δ_uz) + δ_uv c_z + c_v δ_uz``; ``H = s̄ I``."""
    V = s.var()
    c = ((s - s.mean())[:, None] * (b - b.mean(0))).mean(0)
    B = np.cov(b.T, bias=True)
    d = b.shape[1]
    eye = np.eye(d)

    def d_diffusion(x):  # d_diffusion(x)[u, v, z] = ∂_u D_vz
        return (
            V * (np.einsum("uv,z->uvz", eye, x) + np.einsum("v,uz->uvz", x, eye))
            + np.einsum("uv,z->uvz", eye, c)
            + np.einsum("v,uz->uvz", c, eye)
        )

    def rhs(_, state):
        x, v = state[:d], state[d:]
        D = V * np.outer(x, x) + np.outer(x, c) + np.outer(c, x) + B
        g = eye + eps * D
        dg = eps * d_diffusion(x)
        first_kind = 0.5 * (
            np.einsum("uzv->zuv", dg) + np.einsum("vzu->zuv", dg) - np.einsum("zuv->zuv", dg)
        )
        gamma = (
            np.linalg.solve(g, first_kind.reshape(d, -1)).reshape(d, d, d) if exact else first_kind
        )
        return np.concatenate([v, -np.einsum("wuv,u,v->w", gamma, v, v) - s.mean() * v])

    def initial_velocity(x):
        D = V * np.outer(x, x) + np.outer(x, c) + np.outer(c, x) + B
        return -np.linalg.solve(eye + eps * D, s.mean() * x + b.mean(0))

    return rhs, initial_velocity


@pytest.mark.parametrize("exact", [True, False])
def test_geodesic_with_nonzero_christoffel_against_a_hand_derived_equation(exact):
    from scipy.integrate import solve_ivp

    gen = np.random.default_rng(4)
    s = gen.uniform(0.5, 1.5, 6)
    b = gen.normal(size=(6, 3))
    start = np.array([1.5, -1.0, 0.8])
    model = ScaledSpheres(start.tolist())
    data = (torch.tensor(np.column_stack([s, b])), torch.zeros(6))
    eps = 0.2
    rhs, initial_velocity = hand_geodesic_rhs(s, b, eps, exact)
    t = np.linspace(0, 2.0, 9)
    reference = solve_ivp(
        rhs,
        (0, 2.0),
        np.concatenate([start, initial_velocity(start)]),
        t_eval=t,
        rtol=1e-12,
        atol=1e-14,
        method="DOP853",
    )
    ours = geodesic(
        model,
        lambda out, _: out,
        data,
        torch.tensor(start),
        t,
        eps,
        inverse="exact" if exact else "weak",
        rtol=1e-11,
        atol=1e-13,
    )
    np.testing.assert_allclose(ours.x, reference.y[:3].T, atol=1e-8)
    np.testing.assert_allclose(ours.v, reference.y[3:].T, atol=1e-8)
    flat = solve_ivp(  # without Γ: the test tells the Christoffel term apart
        lambda _, st: np.concatenate([st[3:], -s.mean() * st[3:]]),
        (0, 2.0),
        reference.y[:, 0],
        t_eval=t,
        rtol=1e-12,
        atol=1e-14,
    )
    assert np.abs(flat.y[:3] - reference.y[:3]).max() > 1e-3


@pytest.mark.parametrize(
    "name", ["tied-autoencoder", "reused-linear", "partly-frozen", "functional-loss"]
)
def test_sgd_ensemble_against_a_plain_loop_on_unusual_models(name):
    """The vectorised ensemble (per-sample gradients, vmap over runs) against plain SGD:
    one autograd backward of the minibatch's mean loss per run and step, same minibatches."""
    import copy

    from tests.cases import make_case

    case = make_case(name)
    space = ParamSpace(case.model)
    x0 = space.vector(case.model).detach().clone()
    runs, batch, steps, lr = 3, 4, 5, 0.05
    ours = sgd_ensemble(
        case.model, case.loss, (case.x, case.y), x0, lr=lr, batch_size=batch, steps=steps,
        runs=runs, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    loss = per_sample_loss(case.loss)
    models = [copy.deepcopy(case.model) for _ in range(runs)]
    for _ in range(steps):
        idx = torch.randint(0, len(case.x), (runs, batch), generator=generator)
        for model, rows in zip(models, idx, strict=True):
            model.zero_grad(set_to_none=True)
            loss(model(case.x[rows]), case.y[rows]).mean().backward()
            with torch.no_grad():
                for p in ParamSpace(model).params(model).values():
                    p.sub_(lr * p.grad)
    plain = np.stack([ParamSpace(m).vector(m).detach().numpy() for m in models])
    np.testing.assert_allclose(ours["iterates"][:, -1], plain, rtol=1e-10, atol=1e-12)
    assert np.abs(plain - x0.numpy()).max() > 1e-4  # the runs moved


def test_per_sample_routes_of_geometry_refuse_batch_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    x0 = ParamSpace(model).vector(model)
    with pytest.raises(InputError, match="BatchNorm layer '1'"):
        sgd_ensemble(model, "cross_entropy", data, x0, lr=0.1, batch_size=4, steps=2, runs=2)
    with pytest.raises(InputError, match="BatchNorm layer '1'"):
        curl(model, "cross_entropy", data, 0.1)
    model.eval()
    assert sgd_ensemble(model, "cross_entropy", data, x0, lr=0.1, batch_size=4, steps=2, runs=2)[
        "iterates"
    ].shape == (2, 3, len(x0))
