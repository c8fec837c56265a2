"""Layer temperatures: hand computations, numpy statistics, the D trace, regime detection."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.experiments.config import parse_config
from sgdgeom.experiments.runner import run_training
from sgdgeom.files import read_jsonl
from sgdgeom.monitors import LayerTemperature
from sgdgeom.monitors import temperature as monitor
from sgdgeom.monitors.regimes import analyse_regimes
from sgdgeom.monitors.temperature import l1_norms


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (5,), generator=g),
        )
        for _ in range(4)
    ]
    return model, batches


def run_epoch(callback, model, batches):
    trainer = SimpleNamespace(model=model)
    callback.on_train_begin(trainer)
    grads = []
    for x, y in batches:
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        callback.on_after_backward(trainer, x, y, loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    metrics = {}
    callback.on_epoch_end(trainer, 1, metrics)
    return metrics, grads


def test_signal_is_mean_absolute_weight_gradient_and_noise_is_numpy_std():
    model, batches = tiny()
    metrics, grads = run_epoch(LayerTemperature(snr=True), model, batches)
    for layer in ("0", "2"):
        per_batch = []
        for g in grads:  # by hand: Σ over the weights (not the bias) of |∂L/∂ω|, over N_I
            weight = g[f"{layer}.weight"]
            total = sum(
                abs(float(weight[i, j]))
                for i in range(weight.shape[0])
                for j in range(weight.shape[1])
            )
            per_batch.append(total / weight.numel())
        signal = metrics[f"temperature/{layer}/signal"]
        assert signal == pytest.approx(np.mean(per_batch), rel=1e-12)
        assert metrics[f"temperature/{layer}/noise"] == pytest.approx(np.std(per_batch), rel=1e-12)
        stacked = np.stack([g[f"{layer}.weight"].numpy() for g in grads])
        assert metrics[f"snr/{layer}/mean_norm"] == pytest.approx(
            np.linalg.norm(stacked.mean(0)), rel=1e-10
        )
        assert metrics[f"snr/{layer}/std_norm"] == pytest.approx(
            np.linalg.norm(stacked.std(0)), rel=1e-8
        )


@pytest.mark.parametrize("kernel", ["numba-serial", "numba-parallel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_norms_equal_a_float64_sum_on_both_routes(kernel, dtype, monkeypatch):
    if kernel.startswith("numba"):
        pytest.importorskip("numba")
        # one torch thread takes numba's serial kernel, more its parallel one
        monkeypatch.setattr(monitor, "numba_parallel", lambda: kernel == "numba-parallel")
    else:
        monkeypatch.setattr(monitor, "_l1_kernel", lambda parallel: None)
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(300, 301, generator=gen, dtype=dtype),  # odd sizes: the kernel's tail
        torch.randn(7, generator=gen, dtype=dtype),
        torch.randn(40, 30, generator=gen, dtype=dtype).T,  # not contiguous
    ]
    expected = [sum(abs(v) for v in t.double().flatten().tolist()) for t in tensors]
    norms = l1_norms(tensors)
    assert norms.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert norms.tolist() == pytest.approx(expected, rel=rel)
    with pytest.raises(ValueError, match="at least one tensor"):
        l1_norms([])


def test_l1_norms_of_bfloat16_on_the_cpu_sum_in_float64():
    # numpy has no bfloat16, so the CPU takes the float64 sum whether numba is there or not
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(257, 129, generator=gen).bfloat16(), torch.randn(5).bfloat16()]
    expected = [sum(abs(v) for v in t.double().flatten().tolist()) for t in tensors]
    norms = l1_norms(tensors)
    assert norms.dtype == torch.bfloat16
    # the float64 sum rounded once: a sum accumulated in bfloat16 is off by ~3e-3 here
    assert torch.equal(norms, torch.tensor(expected, dtype=torch.float64).bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_l1_norms_of_a_list_spanning_cpu_and_cuda_land_on_the_first_device():
    # a model split over devices: torch's foreach norm returns each norm on its own device
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(300, 7, generator=gen), torch.randn(11, generator=gen).cuda()]
    expected = torch.tensor([t.double().abs().sum().item() for t in tensors])
    norms = l1_norms(tensors)
    assert norms.device == tensors[0].device
    # a float32 sum of n terms: within n u of the exact one
    bound = tensors[0].numel() * torch.finfo(torch.float32).eps / 2
    assert torch.allclose(norms, expected, rtol=bound, atol=0)
    assert l1_norms(tensors[::-1]).device == tensors[1].device


def test_trace_equals_the_diffusion_block_trace():
    model, batches = tiny()
    probe = batches[0]
    metrics, _ = run_epoch(LayerTemperature(trace_every=1, probe=probe), model, batches)
    D = DiffusionMatrix(model, "cross_entropy", probe)
    dense = D.dense()
    for layer in ("0", "2"):
        mask = D.space.layer_mask(layer, weights_only=True)
        expected = float(dense[mask][:, mask].trace()) / int(mask.sum())
        assert metrics[f"trace/{layer}"] == pytest.approx(expected, rel=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs a probe"):
        LayerTemperature(trace_every=2)
    model, batches = tiny()
    with pytest.raises(ValueError, match=r"no weight layers named \['fc9'\]"):
        run_epoch(LayerTemperature(["fc9"]), model, batches)


def synthetic(t_cross=15, t_peak=20, t_end=400, slopes=(-0.8, -0.8, -0.8)):
    t = np.arange(1, t_end + 1, dtype=float)
    signal, noise = {}, {}
    for i, slope in enumerate(slopes):
        rise = np.exp(0.1 * (t - t_peak))  # grows until the peak
        decay = (t / t_peak) ** slope  # power-law decay after it
        s = np.where(t <= t_peak, rise, decay) * (1 + i)
        # noise: below the signal before t_cross, above it after
        n = s * np.where(t < t_cross, 0.3, 1.5)
        signal[f"fc{i + 1}"], noise[f"fc{i + 1}"] = s, n
    return t, signal, noise


def test_regimes_found_on_synthetic_curves():
    t, signal, noise = synthetic()
    result = analyse_regimes(t, signal, noise, smooth=1, late_drop=1.0)
    assert result["t_cross"] == 15
    assert result["t_peak"] == 20
    # late regime: log s has fallen 1 nat below its peak: (t/20)^-0.8 = e^-1 at t = 20 e^1.25
    assert result["t_late"] == pytest.approx(np.ceil(20 * np.exp(1 / 0.8)), abs=1)
    for fits in result["layers"].values():
        assert fits["signal_powerlaw_slope"] == pytest.approx(-0.8, abs=1e-9)
    assert result["signal_slope_spread"] < 1e-9
    assert result["common_decay_residual"] < 1e-9


def test_the_paper_crossing_ends_the_signal_regime_and_the_snr_crossing_is_beside_it():
    """t_cross is where the noise of the signal reaches the signal (the paper's dashed and
    solid lines); the gradient SNR's own crossing is reported as t_cross_snr."""
    t, signal, noise = synthetic(t_cross=15)
    ratio = {name: np.where(t < 30, 4.0, 0.5) for name in signal}  # noise wins at t = 30
    result = analyse_regimes(t, signal, noise, snr=ratio, smooth=1)
    assert result["t_cross"] == 15 and result["t_cross_snr"] == 30
    assert result["closest_log_gap"] == pytest.approx(np.log(1.5))


def test_no_paper_crossing_is_reported_as_none_with_the_closest_gap():
    t, signal, _ = synthetic()
    noise = {name: s * 0.5 for name, s in signal.items()}  # dashed always below solid
    result = analyse_regimes(t, signal, noise, smooth=1)
    assert result["t_cross"] is None
    assert result["closest_log_gap"] == pytest.approx(np.log(0.5))


def test_different_decays_are_not_common():
    t, signal, noise = synthetic(slopes=(-0.5, -1.0, -1.5))
    result = analyse_regimes(t, signal, noise, smooth=1)
    assert result["signal_slope_spread"] > 0.3
    assert result["common_decay_residual"] > 0.2


def test_no_late_regime_is_reported():
    t, signal, noise = synthetic(t_end=25)
    result = analyse_regimes(t, signal, noise, smooth=1)
    assert result["t_late"] is None and "train longer" in result["note"]


def test_monitor_config_writes_metrics_report_and_figure(tmp_path):
    config = parse_config(
        {
            "name": "temp",
            "data": {"name": "digits", "batch_size": 32, "n_train": 256},
            "model": {"name": "mlp", "widths": [16]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 6, "device": "cpu"},
            "monitor": {"probe_size": 32, "temperature": {"trace_every": 3, "snr": True}},
        }
    )
    run_training(config, tmp_path, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all("temperature/fc1/signal" in r and "snr/out/ratio" in r for r in records)
    assert ["trace/fc1" in r for r in records] == [False, False, True, False, False, True]
    assert (tmp_path / "regimes.json").is_file()
    assert (tmp_path / "temperatures.png").stat().st_size > 10_000


def test_cli_temperatures_remakes_the_report(tmp_path):
    from tests.test_cli import assert_one_line_error, sgdgeom

    config = parse_config(
        {
            "name": "temp",
            "data": {"name": "digits", "batch_size": 64, "n_train": 128},
            "model": {"name": "mlp", "widths": [8]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 2, "device": "cpu"},
            "monitor": {"temperature": True},
        }
    )
    run_training(config, tmp_path / "run", progress=False)
    (tmp_path / "run/temperatures.png").unlink()
    proc = sgdgeom("temperature", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run/temperatures.png").is_file()
    assert_one_line_error(sgdgeom("temperature", tmp_path), "has no metrics.jsonl")
    old = sgdgeom("temperatures", tmp_path / "run")  # the old name, for one release
    assert old.returncode == 0 and "use sgdgeom temperature" in old.stderr


def test_plain_object_outside_the_trainer_with_its_own_loss():
    """No Trainer: record() after each backward; the trace uses the run's loss (MSE)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    monitor = LayerTemperature(model=model, trace_every=1, probe=(x, y), loss_fn="mse")
    for _ in range(3):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        monitor.record()
    metrics = monitor.epoch_metrics(1)
    D = DiffusionMatrix(model, "mse", (x, y))
    traces = D.param_traces()
    assert metrics["trace/0"] == pytest.approx(traces["0.weight"] / 12, rel=1e-10)
    assert set(metrics) >= {"temperature/0/signal", "temperature/2/noise", "trace/2"}
    assert monitor.epoch_metrics(2) == {}  # reset after an epoch


def test_layers_come_from_the_registry():
    from tests.cases import make_case

    case = make_case("transformer")
    monitor = LayerTemperature(model=case.model)
    # attention (the fallback rule) is one layer with its two projection matrices; LayerNorm
    # has no weight matrix; frozen weights are not monitored
    assert "layers.layers.0.self_attn" in monitor.layers
    assert [n for n, _ in monitor.layers["layers.layers.0.self_attn"]] == [
        "layers.layers.0.self_attn.in_proj_weight",
        "layers.layers.0.self_attn.out_proj.weight",
    ]
    assert not any("norm" in name for name in monitor.layers)
    frozen = make_case("partly-frozen")
    assert list(LayerTemperature(model=frozen.model).layers) == ["fc2", "out"]


def test_a_missing_gradient_is_an_error_not_a_silent_skip():
    from sgdgeom.optim import DiffusionMetricSGD

    model, batches = tiny()
    monitor = LayerTemperature(model=model)
    opt = DiffusionMetricSGD(model, lr=0.1)  # fused by default: .grad stays empty
    for step, (x, y) in enumerate(batches[:2]):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            monitor.record()  # the first, checked step is unfused
        else:
            with pytest.raises(RuntimeError, match="fused='off'"):
                monitor.record()
        opt.step()
