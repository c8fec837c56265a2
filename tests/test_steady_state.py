"""The steady-state experiment: its fields against closed forms, its distances against
samples of known densities, and a small end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sgdgeom.experiments import steady_state as ss
from sgdgeom.experiments.plane import identity_loss, make_problem
from sgdgeom.geometry import metric_gradient_field
from tests.cases import train_digits_with_monitor


def test_aligned_problem_has_a_diagonal_diffusion_and_a_closed_form_potential():
    """On the aligned quadratic ``D = A C A`` is diagonal and constant, so
    ``Φ(x) = ½ (x − x*)ᵀ (I + εD)⁻¹ A (x − x*)`` exactly."""
    model, data = make_problem("aligned", n=32, seed=1)
    eps = 0.3
    fields = ss._PlaneFields(model, data, eps)
    points = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, D = fields.moments(points)
    assert torch.allclose(D, D[:1].expand_as(D), atol=1e-14)  # constant
    assert abs(float(D[0, 0, 1])) < 1e-14  # diagonal
    A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    centre = data[0].mean(0)
    M = torch.linalg.solve(torch.eye(2, dtype=torch.float64) + eps * D[0], A)
    expected = 0.5 * torch.einsum("pi,ij,pj->p", points - centre, M, points - centre)
    assert torch.allclose(fields.potential(points, centre), expected, atol=1e-13)


def test_metric_gradient_agrees_with_the_woodbury_field():
    model, data = make_problem("rosenbrock", n=16, seed=2)
    fields = ss._PlaneFields(model, data, eps=0.05)
    points = torch.tensor([[0.3, 0.2], [1.1, 0.9], [-0.5, 1.0]], dtype=torch.float64)
    woodbury = metric_gradient_field(model, identity_loss, data, 0.05)
    expected = torch.stack([woodbury(p) for p in points])
    assert torch.allclose(fields.metric_gradient(points), expected, atol=1e-13)
    expected_loss = model(data[0]).mean().detach()
    assert torch.allclose(fields.loss(model.x.detach()[None])[0], expected_loss)


def test_distances_tell_the_right_density_from_a_wrong_one():
    """I.i.d. Gaussian walkers against their own binned density: within a few error bars of
    the sampling floor; against a density twice as wide: far above it."""
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    samples = rng.multivariate_normal([0.0, 0.0], cov, size=(400, 10))
    grid = ss._Grid(np.zeros(2), 4 * np.sqrt(np.diag(cov)), 16)
    points = grid.sub_points()
    counts = grid.counts(samples)
    assert counts.sum() > 0.999 * samples.shape[0] * samples.shape[1]
    own = grid.binned(ss._gaussian_log_density(points, np.zeros(2), cov))
    wide = grid.binned(ss._gaussian_log_density(points, np.zeros(2), 2 * cov))
    right = ss._distance(counts, own, 100, rng)
    wrong = ss._distance(counts, wide, 100, rng)
    halves = np.mean([ss._halves_tv(counts, rng) for _ in range(ss.SPLITS)])
    assert right["tv"] < halves / 2 + 4 * right["stderr"]
    assert wrong["tv"] > halves / 2 + 20 * wrong["stderr"]
    other = grid.counts(rng.multivariate_normal([0.0, 0.0], cov, size=(400, 10)))
    pair = ss._distance(counts, other, 100, rng)
    assert pair["tv"] < halves / np.sqrt(2) + 4 * pair["stderr"]
    moments = ss._weighted_moments(points.mean(1), own)
    np.testing.assert_allclose(moments["cov"], cov, rtol=0.03)


@pytest.mark.parametrize(("problem", "potential"), [("aligned", True), ("quadratic", False)])
def test_small_run_writes_json_and_plot(tmp_path, problem, potential):
    config = ss.SteadyStateConfig(
        name="t",
        problem=problem,
        n=16,
        walkers=60,
        t_burn=2.0,
        t_sample=2.0,
        snapshots=4,
        bins=8,
        bootstrap=20,
    )
    result = ss.run_steady_state(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "steady-state.json").read_text())
    assert saved["potential_exists"] is potential == result["potential_exists"]
    names = set(saved["distances"])
    assert ("exp(-beta Phi), grad Phi = grad_D f" in names) is potential
    assert {"gibbs exp(-beta f)", "SDE stationary (Lyapunov)"} <= names
    assert all(0 <= d["tv"] <= 1 and d["stderr"] > 0 for d in saved["distances"].values())
    assert saved["sgd"]["samples"] == pytest.approx(60 * 5 * saved["sgd"]["inside_grid"])
    assert saved["f12"]["divergence_term_mean"] < 1e-12  # constant D: ∇·D = 0
    assert (tmp_path / "steady-state.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- the monitor


def test_monitor_measures_the_dense_references():
    from torch import nn

    from sgdgeom.monitors import CurrentMonitor
    from sgdgeom.persample import per_sample_loss
    from tests.reference import dense_divergence, per_sample_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (9,), generator=g)
    beta, eps = 50.0, 0.1
    monitor = CurrentMonitor((x, y), probes=None, sections=2, eps=eps, beta=beta)
    metrics = monitor.measure_now(model)
    loss = per_sample_loss("cross_entropy")
    divergence = dense_divergence(model, loss, x, y)
    gradient = per_sample_gradients(model, loss, x, y).mean(0)
    term = eps / beta * float(divergence.norm())
    assert metrics["current/divergence_term"] == pytest.approx(term, rel=1e-10)
    assert metrics["current/j"] == pytest.approx(term, rel=1e-8)  # exact metric gradient
    assert metrics["current/gradient"] == pytest.approx(float(gradient.norm()), rel=1e-12)
    assert metrics["current/ratio"] == pytest.approx(term / float(gradient.norm()), rel=1e-10)
    assert 0 < metrics["current/curl"] < 1
    assert model.training  # the train mode is restored


def test_config_monitor_records_the_current_every_epoch(tmp_path):
    monitor = {"current": {"every": 1, "probes": 4, "sections": 1}, "probe_size": 16}
    records = train_digits_with_monitor(tmp_path / "run", monitor)
    records = [r for r in records if "current/ratio" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["current/beta"] == pytest.approx(2 * 32 / 0.1)
        assert 0 < r["current/ratio"] < float("inf") and r["current/curl"] >= 0
