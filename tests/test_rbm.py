"""RBM: exact likelihood against brute force, CD-k convergence, D and the metric update."""

from __future__ import annotations

import itertools

import pytest
import torch

from sgdgeom.metric import DiffusionMetric
from sgdgeom.rbm import RBM
from tests.reference import assert_close


def tiny(n_visible=5, n_hidden=3, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rbm = RBM(n_visible, n_hidden, init_scale=scale, generator=g).double()
    with torch.no_grad():
        rbm.b.copy_(torch.randn(n_visible, generator=g, dtype=torch.float64) * 0.5)
        rbm.c.copy_(torch.randn(n_hidden, generator=g, dtype=torch.float64) * 0.5)
    return rbm


def all_states(n):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def test_exact_log_likelihood_equals_brute_force_sum():
    rbm = tiny()
    v_all, h_all = all_states(5), all_states(3)
    energies = -(v_all @ rbm.b)[:, None] - (h_all @ rbm.c)[None, :] - v_all @ rbm.W.T @ h_all.T
    log_z = torch.logsumexp(-energies.flatten(), 0).item()
    assert rbm.log_partition() == pytest.approx(log_z, rel=1e-12)
    log_p = torch.logsumexp(-energies, 1) - log_z
    assert_close(rbm.log_likelihood(v_all), log_p.detach(), what="log p(v)")
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-12)


def test_per_sample_cd_gradients_are_free_energy_differences():
    rbm = tiny()
    g = torch.Generator().manual_seed(1)
    v = torch.bernoulli(torch.full((6, 5), 0.5, dtype=torch.float64), generator=g)
    stats = rbm.cd_statistics(v, k=2, generator=g)
    rows = stats.per_sample_gradients()
    for i in range(len(v)):  # g_i = ∇_θ [F(v_i) − F(v'_i)]
        diff = rbm.free_energy(v[i : i + 1]) - rbm.free_energy(stats.v_neg[i : i + 1])
        grads = torch.autograd.grad(diff.sum(), list(rbm.parameters()))
        assert_close(rows[i], torch.cat([t.reshape(-1) for t in grads]), what=f"row {i}")


def test_cd_k_converges_to_the_exact_gradient():
    """CD-1 is biased; with k = 200 Gibbs steps the CD gradient is the exact ∇G to within
    its Monte Carlo error (20,000 chains)."""
    rbm = tiny(scale=0.8)
    data = all_states(5)[torch.tensor([1, 6, 11, 19, 30])]
    exact = rbm.exact_gradient(data).detach()
    replicated = data.repeat(4000, 1)
    errors, noise = {}, {}
    for k in (1, 200):
        stats = rbm.cd_statistics(replicated, k=k, generator=torch.Generator().manual_seed(k))
        rows = stats.per_sample_gradients()
        errors[k] = float((rows.mean(0) - exact).norm())
        noise[k] = float((rows.std(0) / len(rows) ** 0.5).norm())  # MC standard error
    assert errors[1] > 3 * noise[1]  # CD-1's bias stands out of the noise
    assert errors[200] < 3 * noise[200]  # CD-200 is unbiased to within the noise


def test_diffusion_matrix_and_metric_update_equal_dense():
    rbm = tiny()
    g = torch.Generator().manual_seed(2)
    v = torch.bernoulli(torch.full((10, 5), 0.5, dtype=torch.float64), generator=g)
    stats = rbm.cd_statistics(v, k=1, generator=g)
    rows = stats.per_sample_gradients()
    centred = rows - rows.mean(0)
    dense = centred.T @ centred / len(rows)
    D = rbm.diffusion_matrix(stats)
    assert_close(D.dense(), dense, what="D of the CD gradients")
    for metric, exact in (("exact", True), ("weak", False)):
        before = [p.detach().clone() for p in rbm.parameters()]
        eps = DiffusionMetric(D, "auto").eps
        eye = torch.eye(len(dense), dtype=torch.float64)
        g_bar = rows.mean(0)
        step = (
            torch.linalg.solve(eye + eps * dense, g_bar) if exact else g_bar - eps * dense @ g_bar
        )
        rbm.weight_update(stats, lr=0.1, metric=metric)
        after = torch.cat([p.detach().reshape(-1) for p in rbm.parameters()])
        assert_close(
            after, torch.cat([b.reshape(-1) for b in before]) - 0.1 * step, what=f"{metric} update"
        )
        with torch.no_grad():
            for p, b in zip(rbm.parameters(), before, strict=True):
                p.copy_(b)


def test_ais_matches_the_exact_partition_function():
    rbm = tiny(n_visible=12, n_hidden=8, scale=0.5)
    exact = rbm.log_partition()
    estimate, se = rbm.ais_log_partition(
        chains=200, betas=500, generator=torch.Generator().manual_seed(0)
    )
    assert abs(estimate - exact) < max(4 * se, 0.02)


def test_bad_input():
    with pytest.raises(ValueError, match="layer sizes"):
        RBM(0, 3)
    with pytest.raises(ValueError, match="n_hidden <= 20"):
        RBM(4, 21).log_partition()
    rbm = tiny()
    with pytest.raises(ValueError, match="k must be"):
        rbm.cd_statistics(torch.zeros(2, 5, dtype=torch.float64), k=0)


def test_rbm_experiment_writes_histories_summary_and_plots(tmp_path):
    from sgdgeom.experiments.rbm import RBMConfig, run_rbm

    config = RBMConfig(
        name="t", n_hidden=4, n_train=64, epochs=2, batch_size=16, spectrum_every=1, probe_size=32
    )
    summary = run_rbm(config, tmp_path, progress=False)
    assert set(summary["updates"]) == {"cd", "metric-weak", "metric-exact"}
    for update in summary["updates"]:
        records = (tmp_path / update / "history.jsonl").read_text().splitlines()
        assert len(records) == 2
    assert summary["updates"]["cd"]["test_loglik"] < 0
    assert (tmp_path / "loglik.png").is_file() and (tmp_path / "spectrum.png").is_file()


def test_rbm_lr_decay_scales_every_update(tmp_path, monkeypatch):
    """``lr_decay: linear``: update u of U steps with lr (1 − u/U), for every rule alike."""
    from sgdgeom.experiments.rbm import RBMConfig, run_rbm

    seen = []
    original = RBM.weight_update

    def recording(self, stats, lr, **kwargs):
        seen.append(lr)
        return original(self, stats, lr, **kwargs)

    monkeypatch.setattr(RBM, "weight_update", recording)
    config = RBMConfig(
        name="t", n_hidden=4, n_train=64, epochs=2, batch_size=16, lr=0.1, lr_decay="linear",
        updates=["cd"], spectrum_every=2, probe_size=32,
    )  # fmt: skip
    run_rbm(config, tmp_path, progress=False)
    total = 2 * (64 // 16)
    assert seen == pytest.approx([0.1 * (1 - u / total) for u in range(total)])


def test_rbm_config_errors(tmp_path):
    from sgdgeom.errors import ConfigError
    from sgdgeom.experiments.rbm import load_rbm_config

    path = tmp_path / "r.yaml"
    path.write_text("name: x\nn_hidden: 40\nlearning_rate: 1\n")
    with pytest.raises(
        ConfigError,
        match=r"n_hidden: .*less than or equal to 20.*"
        r"learning_rate: unknown key; allowed: name, seed",
    ):
        load_rbm_config(path)
