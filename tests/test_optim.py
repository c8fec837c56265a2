"""DiffusionMetricSGD: dense equivalence, the torch.optim contract, descent, and DDP."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import per_sample_loss
from tests.cases import make_case
from tests.distributed import spawn
from tests.reference import dense_diffusion, per_sample_gradients


def dense_update(case, eps, mode):
    """x − (I + εD)⁻¹ ḡ or x − (I − εD) ḡ with D, ḡ of the batch, from explicit gradients."""
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    D, g_bar = dense_diffusion(G), G.mean(0)
    eye = torch.eye(len(D), dtype=torch.float64)
    eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1]) if eps == "auto" else eps
    step = torch.linalg.solve(eye + eps * D, g_bar) if mode == "exact" else g_bar - eps * D @ g_bar
    x = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    return x - step, eps


def loss_and_backward(case):
    loss = per_sample_loss(case.loss)(case.model(case.x), case.y).mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize("eps", ["auto", "fixed"])
@pytest.mark.parametrize(
    "name", ["mlp-relu", "small-cnn", "sequence", "mse-regression", "layernorm"]
)
def test_update_equals_dense_update(name, eps, mode):
    case = make_case(name)
    eps_value = "auto" if eps == "auto" else 0.8 / _lambda_max(case)
    expected, eps_used = dense_update(case, eps_value, mode)
    opt = DiffusionMetricSGD(
        case.model, lr=1.0, eps=eps_used if eps == "fixed" else "auto", mode=mode
    )
    if name == "layernorm":  # no fast route: the closure gives the per-sample losses
        assert not opt.attached
        opt.step(lambda: per_sample_loss(case.loss)(case.model(case.x), case.y))
    else:
        assert opt.attached
        loss_and_backward(case)
        opt.step()
    x = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == pytest.approx(eps_used, rel=1e-9)


@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize("eps", ["auto", "fixed"])
@pytest.mark.parametrize("name", ["mlp-relu", "sequence", "mse-regression"])
def test_fused_update_equals_dense_update(name, eps, mode):
    """fused=True: no weight gradients in the backward, the metric gradient in their place."""
    case = make_case(name)
    eps_value = "auto" if eps == "auto" else 0.8 / _lambda_max(case)
    expected, eps_used = dense_update(case, eps_value, mode)
    opt = DiffusionMetricSGD(
        case.model, lr=1.0, eps=eps_used if eps == "fixed" else "auto", mode=mode, fused=True
    )
    loss_and_backward(case)
    assert all(p.grad is None for p in case.model.parameters())
    opt.step()
    x = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == pytest.approx(eps_used, rel=1e-9)


def test_fused_equals_unfused_over_steps_with_momentum_and_decay():
    cases = [make_case("mlp-tanh"), make_case("mlp-tanh")]
    opts = [
        DiffusionMetricSGD(
            c.model,
            lr=0.3,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.01,
            mode="exact",
            fused=fused,
        )
        for c, fused in zip(cases, (False, True), strict=True)
    ]
    x = cases[0].x.clone().requires_grad_()
    for _ in range(3):
        input_grads = []
        for c, opt in zip(cases, opts, strict=True):
            opt.zero_grad()
            loss = per_sample_loss(c.loss)(c.model(x), c.y).mean()
            input_grads.append(torch.autograd.grad(loss, x, retain_graph=True)[0])
            loss.backward()
            opt.step()
        torch.testing.assert_close(input_grads[0], input_grads[1], rtol=0, atol=1e-13)
    for p, q in zip(cases[0].model.parameters(), cases[1].model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_fused_detach_gives_the_layers_their_weight_gradients_back():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1, fused=True)
    loss_and_backward(case)
    assert all(p.grad is None for p in case.model.parameters())
    opt.detach()
    loss_and_backward(case)
    assert all(p.grad is not None for p in case.model.parameters())
    assert all("forward" not in m.__dict__ for m in case.model.modules())


def test_fused_refuses_what_it_cannot_fuse():
    cnn = make_case("small-cnn").model
    before = {name: dict(m._forward_hooks) for name, m in cnn.named_modules()}
    with pytest.raises(ValueError, match="Linear layers only"):
        DiffusionMetricSGD(cnn, lr=0.1, fused=True)
    assert {name: dict(m._forward_hooks) for name, m in cnn.named_modules()} == before
    with pytest.raises(ValueError, match="needs the model itself"):
        DiffusionMetricSGD(list(make_case("mlp-relu").model.parameters()), lr=0.1, fused=True)


def test_fixed_eps_just_below_one_over_lambda_max_is_accepted():
    """A fixed ε with ε tr D >= 1 is checked by a Cholesky factorisation of I − εK."""
    case = make_case("mlp-relu")
    lam = _lambda_max(case)
    opt = DiffusionMetricSGD(case.model, lr=0.0, eps=0.999 / lam, fused=True)
    loss_and_backward(case)
    opt.step()
    assert opt.stats["eps"] * opt.stats["trace"] >= 1  # the Cholesky path decided
    opt = DiffusionMetricSGD(case.model, lr=0.0, eps=1.001 / lam, fused=True)
    loss_and_backward(case)
    with pytest.raises(ValueError, match=r"at or above 1/λ_max"):
        opt.step()


def _lambda_max(case):
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    return float(torch.linalg.eigvalsh(dense_diffusion(G))[-1])


def test_model_converted_after_the_optimizer_was_made():
    """The Trainer builds the optimizer, then moves the model (to CUDA, or another dtype)."""
    case = make_case("mlp-relu")
    case.model.float()
    opt = DiffusionMetricSGD(case.model, lr=1.0, eps="auto", mode="exact")
    case.model.double()
    expected, _ = dense_update(case, "auto", "exact")
    loss_and_backward(case)
    opt.step()
    x = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-10)


def test_eps_at_or_above_one_over_lambda_max_raises():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1, eps=1.5 / _lambda_max(case))
    loss_and_backward(case)
    with pytest.raises(ValueError, match=r"at or above 1/λ_max"):
        opt.step()


def test_state_dict_round_trip():
    case = make_case("mlp-tanh")
    twin = make_case("mlp-tanh")
    opt = DiffusionMetricSGD(case.model, lr=0.05, momentum=0.9, mode="exact")
    loss_and_backward(case)
    opt.step()
    other = DiffusionMetricSGD(twin.model, lr=0.05, momentum=0.9, mode="exact")
    twin.model.load_state_dict(case.model.state_dict())
    buffer = io.BytesIO()  # a real round trip: through serialisation, as a checkpoint does
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    for c in (case, twin):
        c.model.zero_grad()
        loss_and_backward(c)
    opt.step()
    other.step()
    for p, q in zip(case.model.parameters(), twin.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert other.state_dict()["param_groups"][0]["mode"] == "exact"


def test_no_grads_means_no_step():
    case = make_case("mlp-relu")
    before = [p.clone() for p in case.model.parameters()]
    DiffusionMetricSGD(case.model, lr=1.0).step()
    for p, q in zip(before, case.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_documented_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        DiffusionMetricSGD(model, lr=-1)
    with pytest.raises(ValueError, match="Invalid momentum value"):
        DiffusionMetricSGD(model, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="Invalid mode"):
        DiffusionMetricSGD(model, lr=0.1, mode="strong")
    with pytest.raises(ValueError, match="Invalid eps"):
        DiffusionMetricSGD(model, lr=0.1, eps="small")
    with pytest.raises(ValueError, match="Invalid safety"):
        DiffusionMetricSGD(model, lr=0.1, safety=2)
    with pytest.raises(ValueError, match="Nesterov"):
        DiffusionMetricSGD(model, lr=0.1, nesterov=True)
    opt = DiffusionMetricSGD(model, lr=0.1)
    model.weight.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="no forward and backward of layer"):
        opt.step()
    with pytest.raises(RuntimeError, match="per-sample losses"):
        DiffusionMetricSGD([nn.Parameter(torch.zeros(2))], lr=0.1).step()


def noisy_quadratic(seed):
    g = torch.Generator().manual_seed(seed)
    curvature = torch.tensor([1.0, 10.0], dtype=torch.float64)
    centres = torch.randn(32, 2, dtype=torch.float64, generator=g) * 0.3

    def losses(x):
        return 0.5 * ((x - centres).square() * curvature).sum(1)

    return losses


def noisy_rosenbrock(seed):
    a = 1 + 0.1 * torch.randn(
        32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )

    def losses(x):
        return (a - x[0]).square() + 10 * (x[1] - x[0].square()).square()

    return losses


@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize(
    ("problem", "start", "lr", "steps"),
    [(noisy_quadratic, [2.0, -1.5], 0.05, 60), (noisy_rosenbrock, [-1.0, 1.5], 0.01, 300)],
)
def test_loss_falls_on_noisy_problems(problem, start, lr, steps, mode):
    x = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = DiffusionMetricSGD([x], lr=lr, mode=mode, momentum=0.5)
    first = None
    for step in range(steps):
        losses_of = problem(step)  # a new minibatch of noise every step
        loss = opt.step(lambda losses_of=losses_of: losses_of(x))
        first = float(loss) if first is None else first
    final = float(problem(10_000)(x.detach()).mean())
    assert final < 0.1 * first, (first, final)


def _ddp_worker(rank, world, results, mode):
    case = make_case("mlp-relu")
    half = len(case.x) // world
    x, y = case.x[rank * half : (rank + 1) * half], case.y[rank * half : (rank + 1) * half]
    model = nn.parallel.DistributedDataParallel(case.model)
    opt = DiffusionMetricSGD(model, lr=1.0, eps="auto", mode=mode)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    # the closure route on a plain model: the rows of G are all-gathered
    plain = make_case("layernorm")
    xs, ys = plain.x[:8][rank * 4 : (rank + 1) * 4], plain.y[:8][rank * 4 : (rank + 1) * 4]
    closure_opt = DiffusionMetricSGD(plain.model, lr=1.0, mode=mode)
    closure_opt.step(lambda: nn.functional.cross_entropy(plain.model(xs), ys, reduction="none"))
    if rank == 0:
        flat = [
            torch.cat([p.detach().reshape(-1) for p in m.parameters()])
            for m in (case.model, plain.model)
        ]
        torch.save(flat, results)


@pytest.mark.parametrize("mode", ["weak", "exact"])
def test_ddp_uses_the_global_batch(tmp_path, mode):
    results = tmp_path / "rank0.pt"
    spawn(_ddp_worker, tmp_path, str(results), mode)
    ddp_params, closure_params = torch.load(results)
    case = make_case("mlp-relu")
    case.x, case.y = case.x[:12], case.y[:12]
    opt = DiffusionMetricSGD(case.model, lr=1.0, eps="auto", mode=mode)
    loss_and_backward(case)
    opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    torch.testing.assert_close(ddp_params, single, rtol=0, atol=1e-6)
    plain = make_case("layernorm")
    opt = DiffusionMetricSGD(plain.model, lr=1.0, mode=mode)
    opt.step(
        lambda: nn.functional.cross_entropy(plain.model(plain.x[:8]), plain.y[:8], reduction="none")
    )
    single = torch.cat([p.detach().reshape(-1) for p in plain.model.parameters()])
    torch.testing.assert_close(closure_params, single, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "weight_decay": 0.01},
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
    ],
)
def test_heavy_ball_is_torch_sgd(settings):
    """The shared update rule, over a list of tensors, against torch.optim.SGD itself."""
    from sgdgeom.optim.momentum import heavy_ball

    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(5, generator=g)]
    theirs = [nn.Parameter(p.clone()) for p in ours]
    reference = torch.optim.SGD(theirs, lr=0.1, **settings)
    group = {"dampening": 0.0, "nesterov": False, "weight_decay": 0.0, **settings}
    states = [{}, {}]
    for _ in range(4):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in ours]
        for p, grad in zip(theirs, grads, strict=True):
            p.grad = grad.clone()
        reference.step()
        torch._foreach_add_(ours, heavy_ball(grads, ours, group, states), alpha=-0.1)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-15)
