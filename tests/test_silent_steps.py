"""The hooked loop's steps where a training loop does something the captures alone do not
see: each step is exact against dense per-sample gradients, or refused with a message.

Gradient clipping and penalties (``.grad`` changed after the backward), several forwards
under one backward, an extra forward between the loss and its backward, a summed loss,
samples the loss leaves out, and an Embedding that couples the samples' gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import NoGrad, per_sample_loss
from tests.cases import make_case
from tests.reference import dense_diffusion, per_sample_gradients

LR = 0.1


def mlp() -> nn.Module:
    torch.manual_seed(0)  # Tanh saves its output, so the first Linear's output is freed
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def data(model: nn.Module, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (n, 5) if isinstance(model[0], nn.Linear) else (n, 2, 6, 6)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ce_none(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def dense_step(model, x, y, inverse, edit=lambda g: g, loss=ce_none):
    """``g⁻¹ v`` (exact) or ``(I − εD) v`` (weak) with ``v = edit(ḡ)``, D and ε = 0.5/λ_max
    of the batch's explicit per-sample gradients."""
    G = per_sample_gradients(model, loss, x, y)
    D, v = dense_diffusion(G), edit(G.mean(0))
    eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1])
    if inverse == "exact":
        return torch.linalg.solve(torch.eye(len(D), dtype=D.dtype) + eps * D, v)
    return v - eps * D @ v


def clipped(max_norm: float):
    """``torch.nn.utils.clip_grad_norm_`` on one flat vector (its 1e-6 included)."""
    return lambda g: g * min(1.0, max_norm / (float(g.norm()) + 1e-6))


# ---------------------------------------------------------------------- .grad changed


@pytest.mark.parametrize("inverse", ["weak", "exact"])
def test_clipping_unfused_is_the_metric_gradient_of_the_clipped_gradient(inverse):
    model, twin = mlp(), mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse=inverse, fused="off")
    for _ in range(3):  # the first (checked) step and two more: once, only the first clipped
        twin.load_state_dict(model.state_dict())
        expected = flat(model) - LR * dense_step(twin, x, y, inverse, clipped(0.05))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


def test_a_penalty_added_to_grad_by_hand_is_stepped_on():
    model, twin = mlp(), mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact", fused="off")
    for _ in range(2):
        twin.load_state_dict(model.state_dict())
        penalised = dense_step(twin, x, y, "exact", lambda g: g + 0.3 * flat(twin))
        expected = flat(model) - LR * penalised
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad.add_(p.detach(), alpha=0.3)
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


def test_clipping_a_fused_step_is_refused_with_the_reason():
    model, twin = mlp(), mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact")  # fused by default
    twin.load_state_dict(model.state_dict())
    expected = flat(model) - LR * dense_step(twin, x, y, "exact", clipped(0.05))
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()  # the checked first step runs unfused: clipped and exact
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(isinstance(p.grad, NoGrad) for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"0\.weight\.grad was read.*fused='off'"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    before = flat(model)
    opt.zero_grad(set_to_none=False)  # zeroing the placeholder is fine
    opt.step()  # and the fused step itself still runs, with the unclipped gradient
    assert not torch.equal(flat(model), before)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- passes


@pytest.mark.parametrize("fused", ["off", "on"])
def test_two_forwards_under_one_backward_step_on_their_union(fused):
    model, twin = mlp(), mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact", fused=fused)
    for _ in range(3):
        twin.load_state_dict(model.state_dict())
        expected = flat(model) - LR * dense_step(twin, x, y, "exact")
        opt.zero_grad()
        first = F.cross_entropy(model(x[:8]), y[:8])
        second = F.cross_entropy(model(x[8:]), y[8:])
        ((first + second) / 2).backward()
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("fused", ["off", "on"])
def test_an_extra_forward_between_the_loss_and_its_backward_is_ignored(make, fused):
    """The README's pattern, on models whose layer outputs the graph does not keep."""
    model, twin = make(), make()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact", fused=fused)
    for _ in range(2):
        twin.load_state_dict(model.state_dict())
        expected = flat(model) - LR * dense_step(twin, x, y, "exact")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        model(x[:4])  # an evaluation inside the loop: never backpropagated
        loss.backward()
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- the loss's samples


@pytest.mark.parametrize("fused", ["off", "on"])
def test_a_summed_loss_with_loss_reduction_sum_steps_as_torch_optim_would(fused):
    model, twin = mlp(), mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="weak", loss_reduction="sum", fused=fused)
    for _ in range(2):
        twin.load_state_dict(model.state_dict())
        expected = flat(model) - LR * len(x) * dense_step(twin, x, y, "weak")
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)


LEFT_OUT = {
    "ignore_index": lambda out, y: F.cross_entropy(
        out, torch.where(torch.arange(len(y)) < 6, -100, y), ignore_index=-100
    ),
    "part of the output": lambda out, y: F.cross_entropy(out[:8], y[:8]),
}


@pytest.mark.parametrize("sync", ["host", "device"])
@pytest.mark.parametrize("case", list(LEFT_OUT))
def test_samples_the_loss_leaves_out_are_refused_and_nothing_moves(case, sync):
    model = mlp()
    x, y = data(model)
    opt = DiffusionMetricSGD(model, lr=LR, sync=sync)
    before = flat(model)
    LEFT_OUT[case](model(x), y).backward()
    with pytest.raises(InputError, match="exactly zero gradient.*ignore_index.*closure"):
        opt.step()
        opt.stats  # noqa: B018  (a device-synchronised step raises at the next read)
    assert torch.equal(flat(model), before)


def test_kept_zero_gradient_samples_count_in_d_as_zero_rows():
    """``zero_gradient_samples="keep"``: a hinge loss whose margin some samples meet."""
    model, twin = mlp(), mlp()
    x, y = data(model)

    def hinge(out, y):
        return F.multi_margin_loss(out, y, margin=0.05, reduction="none")

    twin.load_state_dict(model.state_dict())
    G = per_sample_gradients(twin, hinge, x, y)
    assert 0 < int((G.norm(dim=1) == 0).sum()) < len(x)  # some met the margin
    expected = flat(model) - LR * dense_step(twin, x, y, "exact", loss=hinge)
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact", zero_gradient_samples="keep")
    hinge(model(x), y).mean().backward()
    opt.step()
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="zero_gradient_samples"):
        DiffusionMetricSGD(mlp(), lr=LR, zero_gradient_samples="drop")


def test_an_embedding_that_scales_by_frequency_is_refused_on_every_route():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    tokens, y = torch.randint(0, 10, (16, 3)), torch.randint(0, 3, (16,))
    match = "Embedding '0' has scale_grad_by_freq=True"
    with pytest.raises(UnsupportedModelError, match=match):
        DiffusionMatrix(model, "cross_entropy", (tokens, y)).trace()
    opt = DiffusionMetricSGD(model, lr=LR)
    F.cross_entropy(model(tokens), y).backward()
    with pytest.raises(UnsupportedModelError, match=match):
        opt.step()


@pytest.mark.parametrize(
    "name", ["partly-frozen", "reused-linear", "functional-loss", "inplace-relu", "transformer"]
)
def test_the_zoo_still_steps_exactly_after_an_edit_of_grad(name):
    """The edited route on unusual models: frozen parameters (``.grad`` None beside edited),
    a Linear called twice, a loss that is a functools.partial, an in-place activation, and
    a transformer (sequences; batch and length of its case coincide or not)."""
    case, twin = make_case(name), make_case(name)
    opt = DiffusionMetricSGD(case.model, lr=LR, inverse="exact", fused="off")
    loss = per_sample_loss(case.loss)
    twin.model.load_state_dict(case.model.state_dict())
    expected = flat_trainable(case.model) - LR * dense_step(
        twin.model, case.x, case.y, "exact", clipped(0.01), loss=loss
    )
    loss(case.model(case.x), case.y).mean().backward()
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), 0.01)
    opt.step()
    torch.testing.assert_close(flat_trainable(case.model), expected, rtol=0, atol=1e-12)


def flat_trainable(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ["capture", "generic"])
def test_a_half_precision_model_gets_d_in_float32_with_the_float64_rank(dtype, route):
    model = mlp()
    x, y = data(model, 12)
    reference = DiffusionMatrix(model, "cross_entropy", (x, y), route=route)
    D = DiffusionMatrix(model.to(dtype), "cross_entropy", (x.to(dtype), y), route=route)
    assert D.space.dtype == torch.float32
    assert D.rank() == reference.rank() == len(x) - 1


class TwiceOnSequences(nn.Module):
    """A Linear(8, 8) called twice on sequences of length 8, for a batch of 8: batch =
    features = length, where an index that mixes two of them goes unnoticed elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.mix(x))))
        return self.out(h.mean(1))


def test_clipping_on_coinciding_shapes_is_exact():
    torch.manual_seed(0)
    model, twin = TwiceOnSequences().double(), TwiceOnSequences().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = DiffusionMetricSGD(model, lr=LR, inverse="exact", fused="off")
    for _ in range(2):
        twin.load_state_dict(model.state_dict())
        expected = flat(model) - LR * dense_step(twin, x, y, "exact", clipped(0.05))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-12)
