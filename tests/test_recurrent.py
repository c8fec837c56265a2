"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, batch-first) end to end.

PyTorch's recurrent forward has no ``vmap`` batching rule, so every per-sample map through
one loops over the samples (:func:`sgdgeom.persample.func.map_samples`). Each quantity is
compared with explicit per-sample gradients; the unused final state ``(h, c)`` is fine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.monitors import LayerTemperature
from sgdgeom.optim import DiffusionMetricSGD, PartialLocalEntropy
from tests.reference import dense_diffusion, per_sample_gradients

KINDS = ["LSTM", "GRU", "RNN"]


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # the final state is returned and never used
        return self.fc(out[:, -1])


def setup(kind: str, n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, n, 4, generator=g, dtype=torch.float64)  # batch = length
    return Recurrent(kind).double(), x, torch.randint(0, 3, (n,), generator=g)


def ce_none(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("route", ["capture", "generic"])
@pytest.mark.parametrize("kind", KINDS)
def test_d_of_a_recurrent_model_is_brute_force(kind, route):
    model, x, y = setup(kind)
    dense = dense_diffusion(per_sample_gradients(model, ce_none, x, y))
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route=route)
    torch.testing.assert_close(D.dense(), dense, rtol=0, atol=1e-12)
    expected = torch.linalg.eigvalsh(dense).flip(0)[: len(x)]
    torch.testing.assert_close(D.eigvalsh()[: len(x)], expected, rtol=0, atol=1e-12)
    assert D.trace() == pytest.approx(float(dense.trace()), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_the_metric_step_on_a_recurrent_model_is_the_dense_one(kind):
    model, x, y = setup(kind)
    twin, _, _ = setup(kind)
    opt = DiffusionMetricSGD(model, lr=0.1, inverse="exact")
    for _ in range(2):  # the checked step and a fused one
        twin.load_state_dict(model.state_dict())
        G = per_sample_gradients(twin, ce_none, x, y)
        D = dense_diffusion(G)
        eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1])
        step = torch.linalg.solve(torch.eye(len(D), dtype=D.dtype) + eps * D, G.mean(0))
        expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - 0.1 * step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_pla_smooths_the_recurrent_weights_and_never_their_biases():
    model, x, y = setup("GRU")
    generator = torch.Generator().manual_seed(0)
    pla = PartialLocalEntropy(model, layers=["rnn"], R=0.01, y=2, generator=generator)
    assert list(pla.masks) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    everything = PartialLocalEntropy(model, layers="all", R=0.01, y=2)
    assert set(everything.masks) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"}
    for layers in (["rnn"], ["fc"]):
        pla = PartialLocalEntropy(model, layers=layers, R=0.01, y=2, generator=generator)
        pla(x, y).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()


def test_the_temperature_monitor_traces_a_recurrent_layer():
    model, x, y = setup("LSTM")
    monitor = LayerTemperature(trace_every=1, probe=(x, y), model=model)
    assert set(monitor.layers) == {"rnn", "fc"}
    F.cross_entropy(model(x), y).backward()
    monitor.record()
    metrics = monitor.epoch_metrics(1)
    dense = DiffusionMatrix(model, "cross_entropy", (x, y), route="generic").dense()
    is_weight = torch.cat(
        [
            torch.full((p.numel(),), n in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"))
            for n, p in model.named_parameters()
        ]
    )
    expected = float(dense.diagonal()[is_weight].sum()) / int(is_weight.sum())
    assert metrics["trace/rnn"] == pytest.approx(expected, rel=1e-10)
