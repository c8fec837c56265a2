"""The gradient noise scale: estimators against brute force, their unbiasedness, the monitor
in a loop, under accumulation, autocast and DDP, from a config, the CLI and Lightning."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from sgdgeom import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.models import build_model
from sgdgeom.monitors import NoiseScale
from sgdgeom.noise import (
    RatioOfAverages,
    batch_estimate,
    cross_process_estimate,
    dataset_noise,
    layer_groups,
)
from sgdgeom.persample import CoverageError, per_sample_loss
from sgdgeom.precision import unit_roundoff
from tests.cases import make_case, train_digits_with_monitor
from tests.distributed import spawn
from tests.reference import per_sample_gradients


def brute_force(model, loss, x, y, names):
    """tr Σ̂ and ‖G‖²̂ per layer from explicit per-sample gradients (the module doc's
    formulas, written out)."""
    G = per_sample_gradients(model, per_sample_loss(loss), x, y)
    B, mean = len(G), G.mean(0)
    out, offset = {}, 0
    params = dict(model.named_parameters())
    for name in names:
        numel = params[name].numel()
        g, m = G[:, offset : offset + numel], mean[offset : offset + numel]
        offset += numel
        layer = name.rpartition(".")[0]
        trace = B / (B - 1) * (g.square().sum(1).mean() - m.square().sum())
        grad_sq = m.square().sum() - trace / B
        t, s = out.get(layer, (0.0, 0.0))
        out[layer] = (t + float(trace), s + float(grad_sq))
    return out


def measure(model, loss, x, y, **options):
    monitor = NoiseScale(model, **options)
    per_sample_loss(loss)(model(x), y).mean().backward()
    return monitor.record()


@pytest.mark.parametrize(
    "name",
    ["mlp-tanh", "sequence", "small-cnn", "layernorm", "reused-linear", "partly-frozen",
     "functional-loss", "inplace-relu"],
)  # fmt: skip
def test_the_batch_estimates_equal_brute_force_per_layer(name):
    case = make_case(name)
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    expected = brute_force(copy.deepcopy(case.model), case.loss, case.x, case.y, names)
    record = measure(case.model, case.loss, case.x, case.y)
    for layer, (trace, grad_sq) in expected.items():
        assert record[f"noise/{layer}/trace"] == pytest.approx(trace, rel=1e-10, abs=1e-14)
        assert record[f"noise/{layer}/grad_sq"] == pytest.approx(grad_sq, rel=1e-10, abs=1e-14)
    assert record["noise/trace"] == pytest.approx(sum(t for t, _ in expected.values()), rel=1e-10)
    trace, grad_sq = (sum(v[i] for v in expected.values()) for i in (0, 1))
    # an estimate of ‖G‖² at or below zero (a small batch's noise) reads as B_noise = ∞
    assert record["noise/b_noise"] == (
        pytest.approx(trace / grad_sq, rel=1e-9) if grad_sq > 0 else math.inf
    )


def test_a_tied_head_is_exact_and_a_weight_used_outside_its_modules_is_refused():
    torch.manual_seed(0)
    gpt = build_model("gpt", (5,), 11, dim=8, depth=1, heads=2).double()
    x, y = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    names = [n for n, _ in gpt.named_parameters()]
    expected = brute_force(copy.deepcopy(gpt), "cross_entropy", x, y, names)
    record = measure(gpt, "cross_entropy", x, y)
    assert record["noise/tok/trace"] == pytest.approx(expected["tok"][0], rel=1e-10)
    case = make_case("tied-autoencoder")
    with pytest.raises(CoverageError, match="generic route"):
        measure(case.model, case.loss, case.x, case.y)


def test_the_estimators_are_unbiased():
    """Batches of 8 drawn with replacement from 64 digits: the estimates' means converge to
    the dataset's exact tr D and ‖ḡ‖², within 4 standard errors of those means."""
    torch.manual_seed(0)
    ds_x = torch.randn(64, 6, dtype=torch.float64)
    ds_y = torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    exact = dataset_noise(DiffusionMatrix(model, "cross_entropy", (ds_x, ds_y)))
    monitor = NoiseScale(model)
    g = torch.Generator().manual_seed(1)
    traces, grads = [], []
    for _ in range(400):
        index = torch.randint(0, 64, (8,), generator=g)
        model.zero_grad()
        nn.functional.cross_entropy(model(ds_x[index]), ds_y[index]).backward()
        record = monitor.record()
        traces.append(record["noise/trace"])
        grads.append(record["noise/grad_sq"])
    for values, target in ((traces, exact.trace), (grads, exact.grad_sq)):
        values = torch.tensor(values)
        error = values.std() / math.sqrt(len(values))
        assert abs(float(values.mean()) - target) <= 4 * float(error)


def test_measuring_every_n_steps_records_nothing_in_between():
    case = make_case("mlp-relu")
    monitor = NoiseScale(case.model, every=3)
    measured = []
    for step in range(1, 8):
        case.model.zero_grad()
        per_sample_loss(case.loss)(case.model(case.x), case.y).mean().backward()
        if step % 3 != 1:  # the forward of a step between measurements is not recorded
            assert not monitor._capture.recorder.passes
        if monitor.record() is not None:
            measured.append(step)
    assert measured == [1, 4, 7]
    assert [r["step"] for r in monitor.history] == [1.0, 4.0, 7.0]


def test_gradient_accumulation_gives_the_numbers_of_the_whole_batch():
    case = make_case("mlp-tanh")
    half = len(case.x) // 2  # two equal micro-batches
    x, y = case.x[: 2 * half], case.y[: 2 * half]
    whole = measure(copy.deepcopy(case.model), case.loss, x, y)
    model = copy.deepcopy(case.model)
    monitor = NoiseScale(model)
    for part in (slice(0, half), slice(half, None)):  # each micro-batch's mean, halved
        (per_sample_loss(case.loss)(model(x[part]), y[part]).mean() / 2).backward()
    accumulated = monitor.record()
    for key in ("noise/trace", "noise/grad_sq", "noise/fc1/trace"):
        assert accumulated[key] == pytest.approx(whole[key], rel=1e-10)


def test_under_autocast_the_numbers_are_those_of_float32():
    """bfloat16 captures, float32 sums: tr Σ̂ within the quadratic bound of
    tests/test_mixed_precision.py, 12 L u with L = 2 layers (``‖G‖²̂`` is a difference of
    two such quantities and may cancel, so it is compared through the mean square
    ``‖G‖²̂ + tr Σ̂ / B``, a sum of squares)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    exact = measure(copy.deepcopy(model), "cross_entropy", x, y)
    twin = copy.deepcopy(model)
    monitor = NoiseScale(twin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    mixed = monitor.record()
    tol = 12 * 2 * unit_roundoff(torch.bfloat16)
    assert mixed["noise/trace"] == pytest.approx(exact["noise/trace"], rel=tol)
    square = lambda r: r["noise/grad_sq"] + r["noise/trace"] / 32  # noqa: E731
    assert square(mixed) == pytest.approx(square(exact), rel=tol)


def _ddp_worker(rank, world, out, steps):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ddp = DistributedDataParallel(model)
    monitor = NoiseScale(ddp)  # auto: the cross-process estimator
    data_x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data_y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    records, batches = [], []
    for _ in range(steps):
        index = torch.randint(0, 64, (8 * world,), generator=g)
        mine = index[rank * 8 : (rank + 1) * 8]
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(data_x[mine]), data_y[mine]).backward()
        records.append(monitor.record())
        batches.append(index.tolist())
    if rank == 0:
        torch.save({"records": records, "batches": batches}, out)


def test_the_cross_process_estimator_under_ddp(tmp_path):
    """Two gloo processes of 8 samples each: each step's estimate is the cross-process
    formula on the local and global gradients (checked against brute force), and over 60
    steps it agrees with the within-batch estimator of the same global batches within their
    standard errors."""
    out = tmp_path / "records.pt"
    spawn(_ddp_worker, tmp_path, str(out), 60)
    saved = torch.load(out)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data_x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data_y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(6))
    loss = per_sample_loss("cross_entropy")
    cross, within = [], []
    for step, (record, index) in enumerate(zip(saved["records"], saved["batches"], strict=True)):
        G = per_sample_gradients(model, loss, data_x[index], data_y[index])
        if step == 0:  # the formula, written out, on the first step (the parameters stay)
            local = (G[:8].mean(0).square().sum() + G[8:].mean(0).square().sum()) / 2
            total = G.mean(0).square().sum()
            estimate = cross_process_estimate(local[None], total[None], 8, 16, {"": [0]})
            assert record["noise/trace"] == pytest.approx(estimate.trace, rel=1e-9)
            assert record["noise/grad_sq"] == pytest.approx(estimate.grad_sq, rel=1e-9)
        cross.append(record["noise/trace"])
        sq = G.square().sum(1)[:, None]
        within.append(batch_estimate(sq, G.mean(0).square().sum()[None], {"": [0]}).trace)
    cross, within = torch.tensor(cross), torch.tensor(within)
    error = math.sqrt(float(cross.var() + within.var()) / len(cross))
    assert abs(float(cross.mean() - within.mean())) <= 4 * error


def test_smoothing_and_its_standard_error():
    smoothed = RatioOfAverages(0.9)
    assert math.isnan(smoothed.value)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        smoothed.update(2.0 + 0.2 * float(torch.randn(1, generator=g)), 0.5)
    assert smoothed.value == pytest.approx(4.0, abs=0.3)
    # the long-run weights of an EMA: Σ w² = (1 − β)/(1 + β); scatter 0.2/0.5 = 0.4
    assert smoothed.standard_error == pytest.approx(0.4 * math.sqrt(0.1 / 1.9), rel=0.25)
    state = smoothed.state_dict()
    restored = RatioOfAverages(0.5)
    restored.load_state_dict(state)
    assert restored.value == smoothed.value and restored.decay == 0.9


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(InputError, match="at least 2 samples"):
        batch_estimate(torch.ones(1, 2), torch.ones(2), {"a": [0, 1]})
    with pytest.raises(InputError, match="every per-sample gradient of the batch is zero"):
        batch_estimate(torch.zeros(4, 2), torch.zeros(2), {"a": [0, 1]})
    with pytest.raises(InputError, match="decay"):
        NoiseScale(decay=1.0)
    with pytest.raises(InputError, match="every"):
        NoiseScale(every=0)
    case = make_case("mlp-relu")
    with pytest.raises(InputError, match=r"no layers named \['fc9'\]"):
        NoiseScale(case.model, layers=["fc9"])
    with pytest.raises(InputError, match="torch.distributed"):
        measure(case.model, case.loss, case.x, case.y, estimator="processes")
    assert layer_groups(["fc1.weight", "fc1.bias", "out.weight"]) == {"fc1": [0, 1], "out": [2]}
    fresh = make_case("mlp-relu")
    monitor = NoiseScale(fresh.model)
    per_sample_loss(fresh.loss)(fresh.model(fresh.x), fresh.y).mean().backward()
    fresh.model.zero_grad(set_to_none=True)  # the gradients gone (or fused away)
    with pytest.raises(RuntimeError, match="found no gradient after backward"):
        monitor.record()


def test_the_monitor_from_a_config_writes_its_measurements(tmp_path):
    records = train_digits_with_monitor(
        tmp_path, {"noise_scale": {"every": 2, "temperature": True}}
    )
    last = records[-1]
    assert math.isfinite(last["noise/b_noise_smoothed"]) or last["noise/b_noise_smoothed"] is None
    assert "temperature/fc1/signal" in last and "noise/fc1/b_noise_smoothed" in last
    lines = (tmp_path / "noise_scale.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3, 5, 7]  # 4 steps an epoch


def test_the_noise_command_reports_a_dataset_exactly(tmp_path):
    out = tmp_path / "noise"
    result = subprocess.run(
        [sys.executable, "-m", "sgdgeom", "noise", "--model", "mlp", "--dataset", "digits",
         "--n", "120", "--model-option", "widths=[8]", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "noise.json").read_text())
    assert (out / "noise.png").stat().st_size > 0
    assert "B_noise" in result.stdout
    from sgdgeom.data import load_dataset

    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", ds.input_shape, 10, widths=[8]).double().eval()
    x, y = ds.normalize(ds.x_train[:120]).double(), ds.y_train[:120]
    exact = dataset_noise(DiffusionMatrix(model, "cross_entropy", (x, y)))
    assert report["b_noise"] == pytest.approx(exact.b_noise, rel=1e-9)
    assert report["layers"]["fc1"]["trace"] == pytest.approx(exact.layers["fc1"][0], rel=1e-9)


def test_the_lightning_callback_logs_what_the_monitor_measures(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from sgdgeom.integrations.lightning import NoiseScales

    class Classifier(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callback = NoiseScales(every=2, module="net")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Classifier(net), loader)
    assert [r["step"] for r in callback.history] == [1.0, 3.0]
    assert "noise/b_noise_smoothed" in trainer.callback_metrics
