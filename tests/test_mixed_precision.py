"""Mixed precision: autocast, GradScaler and bfloat16 parameters, against float32.

**The tolerance.** Under bfloat16 autocast every matrix product rounds its inputs and its
output to bfloat16, a relative error of at most ``u = 2⁻⁸`` each, and so does the backward
for the gradients it passes on: at most 3 roundings per layer each way. With ``L`` layers
with parameters (an upper bound on the depth of any path) and maps that amplify relative
errors by a factor of order one (the zoo's layers are well-conditioned), a captured input
or output gradient carries a relative error of at most ``3 L u`` to first order. A
per-sample gradient is bilinear in them (``6 L u``); D, its Gram matrix, trace and
``λ_max`` are quadratic (``12 L u``, :func:`quadratic_tolerance`). A metric step
``ḡ − ε D ḡ`` with ``ε = ½ / λ_max`` adds ``ḡ``'s ``6 L u`` to ``ε D ḡ``'s ``12 + 12 + 6``,
and ``‖ε D ḡ‖ ≤ ½ ‖ḡ‖ ≤ ‖ḡ − ε D ḡ‖``: ``36 L u`` (:func:`step_tolerance`). These are
bounds from the rounding model, not fits to what the tests measure (the measured errors
lie 5 to 50 times below them).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.monitors import LayerTemperature
from sgdgeom.optim import DiffusionMetricSGD, PartialLocalEntropy
from sgdgeom.persample import plan_layers
from sgdgeom.precision import capture_dtype, full_precision, unit_roundoff, upcast
from tests.cases import CAPTURE_REFUSED, CASE_NAMES, make_case

BF16_U = unit_roundoff(torch.bfloat16)  # 2⁻⁸


def depth(model: nn.Module) -> int:
    """``L``: the model's layers with parameters (an upper bound on any path's depth)."""
    return len(plan_layers(model, allow_shared=True))


def quadratic_tolerance(model: nn.Module, u: float = BF16_U) -> float:
    """``12 L u``: D, its Gram matrix, trace and ``λ_max`` (module doc)."""
    return 12 * depth(model) * u


def step_tolerance(model: nn.Module, u: float = BF16_U) -> float:
    """``36 L u``: a metric step's update (module doc)."""
    return 36 * depth(model) * u


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def change(model: nn.Module, before: list[torch.Tensor]) -> torch.Tensor:
    """The parameters' change since ``before``, flat."""
    return torch.cat(
        [(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)]
    )


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def float32_case(name: str):
    case = make_case(name)
    x = case.x.float() if case.x.is_floating_point() else case.x
    y = case.y.float() if case.y.is_floating_point() else case.y
    return case.model.float(), case.loss, x, y


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------- the pieces


def test_upcast_converts_lower_precision_floats_only():
    call = {"a": torch.ones(2, dtype=torch.bfloat16), "i": torch.arange(3), "w": torch.ones(2)}
    out = upcast([call], torch.float32)
    assert out[0]["a"].dtype == torch.float32
    assert out[0]["i"].dtype == torch.int64
    assert out[0]["w"] is call["w"]
    same = [{"w": torch.ones(2)}]
    assert upcast(same, torch.float32) is same  # nothing to convert: no copy
    assert capture_dtype(call) == torch.bfloat16


def test_full_precision_switches_autocast_off_and_back():
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with full_precision():
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16


# ---------------------------------------------------------------------- D under autocast


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n not in CAPTURE_REFUSED])
def test_diffusion_under_autocast_matches_float32(name):
    """The capture route keeps autocast's bfloat16 captures and computes in float32: every
    quantity within ``12 L u`` of the float32 computation."""
    model, loss, x, y = float32_case(name)
    exact = DiffusionMatrix(model, loss, (x, y), route="capture")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = DiffusionMatrix(model, loss, (x, y), route="capture")
    assert mixed.space.dtype == torch.float32
    tol = quadratic_tolerance(model)
    v = torch.randn(exact.space.dim, generator=torch.Generator().manual_seed(0))
    assert relative(mixed.gram(), exact.gram()) <= tol
    assert relative(mixed @ v, exact @ v) <= tol
    assert relative(mixed.diagonal(), exact.diagonal()) <= tol
    assert abs(mixed.trace() / exact.trace() - 1) <= tol
    assert abs(mixed.lambda_max() / exact.lambda_max() - 1) <= tol


def test_products_inside_autocast_equal_products_outside():
    """sgdgeom's own arithmetic never runs in the autocast dtype: a product, the spectrum
    and the traces taken inside an autocast region are those taken outside it, bit for bit."""
    model, (x, y) = mlp(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D = DiffusionMatrix(model, "cross_entropy", (x, y))
    v = torch.randn(D.space.dim, generator=torch.Generator().manual_seed(0))
    outside = (D @ v, D.eigvalsh(), D.trace(), D.layer_traces())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (D @ v, D.eigvalsh(), D.trace(), D.layer_traces())
    assert torch.equal(inside[0], outside[0]) and inside[0].dtype == torch.float32
    assert torch.equal(inside[1], outside[1])
    assert inside[2:] == outside[2:]


# ---------------------------------------------------------------------- the optimizers


def metric_step(model, x, y, autocast: bool, inverse: str) -> torch.Tensor:
    """One checked DiffusionMetricSGD step (eps auto): the parameters' change."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = DiffusionMetricSGD(model, lr=0.1, inverse=inverse)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.detach()
    return change(model, before)


@pytest.mark.parametrize("inverse", ["weak", "exact"])
def test_metric_step_under_autocast_matches_float32(inverse):
    model, (x, y) = mlp(), batch()
    exact = metric_step(copy.deepcopy(model), x, y, autocast=False, inverse=inverse)
    mixed = metric_step(copy.deepcopy(model), x, y, autocast=True, inverse=inverse)
    assert relative(mixed, exact) <= step_tolerance(model)


def test_fused_steps_under_autocast_match_float32():
    """Several steps, the later ones fused (no weight gradients), all under autocast."""
    model, (x, y) = mlp(), batch()
    runs = []
    for autocast in (False, True):
        twin = copy.deepcopy(model)
        opt = DiffusionMetricSGD(twin, lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(twin(x), y)
            loss.backward()
            opt.step()
        assert opt.fused and twin[0].weight.grad is None  # the fused steps ran
        runs.append(change(twin, list(model.parameters())))
    # three steps compound three steps' errors
    assert relative(runs[1], runs[0]) <= 3 * step_tolerance(model)


@pytest.mark.parametrize("batching", ["naive", "prefix", "split"])
def test_local_entropy_under_autocast_matches_float32(batching):
    """PLA on the same displacements: the loss within ``3 L u`` (a forward), the gradient
    within ``6 L u`` (bilinear in the captures' counterparts)."""
    model, (x, y) = mlp(), batch()
    results = []
    for autocast in (False, True):
        twin = copy.deepcopy(model)
        pla = PartialLocalEntropy(
            twin, layers=["2"], R=0.05, y=4, batching=batching,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = pla(x, y)
        loss.backward()
        results.append(
            (loss.detach().float(), torch.cat([p.grad.reshape(-1) for p in twin.parameters()]))
        )
    (loss32, grad32), (loss16, grad16) = results
    assert abs(float(loss16 / loss32) - 1) <= 3 * depth(model) * BF16_U
    assert relative(grad16, grad32) <= 6 * depth(model) * BF16_U


def test_temperature_monitor_under_autocast_matches_float32():
    model, (x, y) = mlp(), batch()
    monitor = LayerTemperature(trace_every=1, probe=(x, y), model=model)
    nn.functional.cross_entropy(model(x), y).backward()
    monitor.record()
    exact = monitor.epoch_metrics(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(model(x), y).backward()
        monitor.record()
        mixed = monitor.epoch_metrics(1)
    traces = [k for k in exact if k.startswith("trace/")]
    assert traces
    for key in traces:
        assert abs(mixed[key] / exact[key] - 1) <= quadratic_tolerance(model), key


# ---------------------------------------------------------------------- GradScaler


def scaled_run(
    model, x, y, *, init_scale: float, enabled: bool = True, steps: int = 3, factor: float = 1.0
):
    opt = DiffusionMetricSGD(model, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled)
    stats = []
    for _ in range(steps):
        opt.zero_grad()
        loss = factor * nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        stats.append(opt.stats if opt._stats else None)
    return opt, scaler, stats


def test_loss_scale_leaves_d_and_the_steps_unchanged():
    """A scale of 2¹⁶ is a power of two: D, ε and every update are those of the unscaled
    loss, bit for bit, over checked, momentum-carrying steps."""
    model, (x, y) = mlp(), batch()
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    _, _, stats_plain = scaled_run(plain, x, y, init_scale=2.0**16, enabled=False)
    _, scaler, stats_scaled = scaled_run(scaled, x, y, init_scale=2.0**16)
    assert scaler.get_scale() == 2.0**16  # no overflow, no back-off
    assert stats_scaled == stats_plain
    assert same_parameters(plain, scaled)


def test_a_step_with_an_overflow_is_skipped_and_changes_nothing():
    model, (x, y) = mlp(), batch()
    twin = copy.deepcopy(model)
    # 4 · loss · 2¹²⁷ overflows float32: the scaler finds infinities in .grad
    opt, scaler, stats = scaled_run(twin, x, y, init_scale=2.0**127, steps=1, factor=4.0)
    assert stats == [None] and not opt.state
    assert scaler.get_scale() == 2.0**126  # backed off
    assert same_parameters(model, twin)
    # once the scale has backed off enough, the steps run (and were checked)
    opt, scaler, stats = scaled_run(
        copy.deepcopy(model), x, y, init_scale=2.0**127, steps=4, factor=4.0
    )
    assert stats[-1] is not None and scaler.get_scale() < 2.0**126


def test_unscaling_before_the_step_is_refused_with_the_reason():
    model, (x, y) = mlp(), batch()
    opt = DiffusionMetricSGD(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(InputError, match="without scaler.unscale_"):
        scaler.step(opt)


def test_float16_autocast_with_a_scaler_matches_float32():
    """float16 captures (unscaled in float32, where the unscaled values could underflow)."""
    model, (x, y) = mlp(), batch()
    exact = metric_step(copy.deepcopy(model), x, y, autocast=False, inverse="weak")
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in twin.parameters()]
    opt = DiffusionMetricSGD(twin, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(twin(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    mixed = change(twin, before)
    assert relative(mixed, exact) <= step_tolerance(model, unit_roundoff(torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_autocast_and_scaler_on_cuda():
    model, (x, y) = mlp().cuda(), batch()
    x, y = x.cuda(), y.cuda()
    exact = metric_step(copy.deepcopy(model), x, y, autocast=False, inverse="weak")
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in twin.parameters()]
    opt = DiffusionMetricSGD(twin, lr=0.1, sync="host")
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.cross_entropy(twin(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    mixed = change(twin, before)
    assert relative(mixed, exact) <= step_tolerance(model, unit_roundoff(torch.float16))


# ---------------------------------------------------------------------- bfloat16 parameters


@pytest.mark.parametrize("route", ["capture", "generic"])
def test_bfloat16_parameters_give_float32_operators(route):
    """A bfloat16 model: D works in float32 and is within ``12 L u`` of the float32 D of
    the same (rounded) weights."""
    model, (x, y) = mlp().to(torch.bfloat16), batch()
    D = DiffusionMatrix(model, "cross_entropy", (x.to(torch.bfloat16), y), route=route)
    reference = DiffusionMatrix(
        copy.deepcopy(model).float(), "cross_entropy", (x.to(torch.bfloat16).float(), y)
    )
    assert D.space.dtype == torch.float32
    v = torch.randn(D.space.dim, generator=torch.Generator().manual_seed(0))
    tol = quadratic_tolerance(model)
    assert relative(D @ v, reference @ v) <= tol
    assert abs(D.lambda_max() / reference.lambda_max() - 1) <= tol


def test_bfloat16_parameters_take_the_float32_update():
    """The step computes in float32 and writes the update in bfloat16: each parameter is
    the bfloat16 rounding of (weights + float32 update), up to the update's own error."""
    model, (x, y) = mlp().to(torch.bfloat16), batch()
    reference = copy.deepcopy(model).float()
    xb = x.to(torch.bfloat16)
    exact = metric_step(reference, xb.float(), y, autocast=False, inverse="weak")
    start = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    metric_step(model, xb, y, autocast=False, inverse="weak")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    after = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    # rounding the new weights (u each) and the update's own error (36 L u)
    allowed = 2 * BF16_U * start.norm() + step_tolerance(model) * exact.norm()
    assert float((after - (start + exact)).norm()) <= float(allowed)


@pytest.mark.parametrize("batching", ["naive", "prefix", "split"])
def test_local_entropy_with_bfloat16_parameters(batching):
    model, (x, y) = mlp().to(torch.bfloat16), batch()
    pla = PartialLocalEntropy(model, layers="all", R=0.05, y=4, batching=batching)
    loss = pla(x.to(torch.bfloat16), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
