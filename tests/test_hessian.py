"""The Hessian operator and the alignment of D with H, against dense autograd matrices."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from sgdgeom import DiffusionMatrix
from sgdgeom.alignment import alignment
from sgdgeom.errors import InputError
from sgdgeom.hessian import HessianOperator
from sgdgeom.monitors import AlignmentMonitor
from sgdgeom.persample import per_sample_loss
from tests.cases import make_case, train_digits_with_monitor
from tests.reference import assert_close, dense_diffusion, per_sample_gradients


def dense_hessian(case):
    """The Hessian of the mean loss by plain autograd on the flat trainable parameters."""
    named = {n: p for n, p in case.model.named_parameters() if p.requires_grad}
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
    loss = per_sample_loss(case.loss)

    def mean_loss(vector):
        params, offset = {}, 0
        for name, p in named.items():
            params[name] = vector[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return loss(functional_call(case.model, params, (case.x,)), case.y).mean()

    return torch.autograd.functional.hessian(mean_loss, flat)


@pytest.mark.parametrize(
    "name", ["mlp-tanh", "partly-frozen", "tied-autoencoder", "reused-linear", "functional-loss"]
)
def test_hessian_products_equal_the_dense_hessian(name):
    case = make_case(name)
    H = HessianOperator(case.model, case.loss, (case.x, case.y), chunk_size=4)
    reference = dense_hessian(case)
    assert_close(H.dense(), reference, rtol=1e-10, atol=1e-12, what=f"{name} H")
    V = torch.randn(H.space.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(H @ V, reference @ V, rtol=1e-10, atol=1e-12, what=f"{name} H V")
    assert_close(H @ V[:, 0].contiguous(), reference @ V[:, 0], rtol=1e-10, atol=1e-12, what="Hv")
    top = H.eigsh(2)
    exact = torch.linalg.eigvalsh(reference).flip(0)[:2]
    torch.testing.assert_close(top.values, exact, rtol=1e-8, atol=1e-12)


def _dense_alignment(case, k):
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    Dd, Hd = dense_diffusion(G), dense_hessian(case)
    lam, U = torch.linalg.eigh(Dd)
    mu, V = torch.linalg.eigh(Hd)
    lam, U, mu, V = lam.flip(0)[:k], U.flip(1)[:, :k], mu.flip(0)[:k], V.flip(1)[:, :k]
    Dk, Hk = U @ torch.diag(lam) @ U.T, V @ torch.diag(mu) @ V.T
    return {
        "cosine": float((Dd * Hd).sum() / (Dd.norm() * Hd.norm())),
        "cosine_topk": float((Dk * Hk).sum() / (Dk.norm() * Hk.norm())),
        "overlap": float((U.T @ V).square().sum() / k),
        "rayleigh": (V * (Dd @ V)).sum(0),
        "d_values": lam,
        "h_values": mu,
    }


@pytest.mark.parametrize("name", ["mlp-tanh", "reused-linear", "functional-loss"])
def test_alignment_instruments_equal_a_dense_computation(name):
    case = make_case(name)
    data = (case.x, case.y)
    D = DiffusionMatrix(case.model, case.loss, data)
    H = HessianOperator(case.model, case.loss, data)
    expected = _dense_alignment(case, 3)
    got = alignment(D, H, 3, probes=None)
    assert got.cosine_stderr is None and got.probes is None
    for key in ("cosine", "cosine_topk", "overlap"):
        assert getattr(got, key) == pytest.approx(expected[key], rel=1e-8), key
    for key in ("rayleigh", "d_values", "h_values"):
        assert_close(getattr(got, key), expected[key], rtol=1e-8, atol=1e-12, what=key)
    assert 0 < got.overlap <= 1 and abs(got.cosine) <= 1
    estimate = alignment(D, H, 3, probes=300, seed=1)
    assert estimate.cosine_stderr > 0
    assert abs(estimate.cosine - expected["cosine"]) < 4 * estimate.cosine_stderr
    assert estimate.as_dict()["probes"] == 300


def test_alignment_refuses_operators_of_different_problems():
    a, b = make_case("mlp-tanh"), make_case("mlp-relu")
    D = DiffusionMatrix(a.model, a.loss, (a.x, a.y))
    H = HessianOperator(b.model, b.loss, (b.x, b.y))
    with pytest.raises(InputError, match="same model"):
        alignment(D, H, 2)
    with pytest.raises(InputError, match="probes must be None"):
        alignment(D, HessianOperator(a.model, a.loss, (a.x, a.y)), 2, probes=1)


def test_alignment_monitor_measures_in_eval_mode_and_restores_the_mode():
    case = make_case("mlp-tanh")
    monitor = AlignmentMonitor((case.x, case.y), case.loss, k=2, probes=8)
    case.model.train()
    metrics = monitor.measure_now(case.model)
    assert case.model.training
    assert set(metrics) >= {"alignment/cosine", "alignment/overlap", "alignment/rayleigh_top"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0 < metrics["alignment/rayleigh_top"] <= 1 + 1e-12


def test_config_monitor_records_the_alignment(tmp_path):
    monitor = {"alignment": {"every": 2, "k": 3}, "probe_size": 32}
    records = train_digits_with_monitor(tmp_path / "run", monitor)
    records = [r for r in records if "alignment/cosine" in r]
    assert [r["epoch"] for r in records] == [2]
    assert 0 < records[0]["alignment/overlap"] <= 1 and records[0]["alignment/h_top"] > 0
