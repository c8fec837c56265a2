"""DiffusionMetricSGD: dense equivalence, the torch.optim contract, descent, and DDP."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import UnsupportedModelError
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import CoverageError, NoGrad, per_sample_loss
from tests.cases import CAPTURE_REFUSED, CASE_NAMES, make_case
from tests.distributed import spawn
from tests.reference import dense_diffusion, per_sample_gradients


def dense_update(case, eps, mode, lr=1.0):
    """x − lr (I + εD)⁻¹ ḡ or x − lr (I − εD) ḡ with D, ḡ of the batch, from explicit
    gradients (trainable parameters only), computed on a twin of the model: the optimizer
    under test records every backward through its model."""
    twin = make_case(case.name)
    twin.model.load_state_dict(case.model.state_dict())
    G = per_sample_gradients(twin.model, per_sample_loss(case.loss), case.x, case.y)
    D, g_bar = dense_diffusion(G), G.mean(0)
    eye = torch.eye(len(D), dtype=torch.float64)
    eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1]) if eps == "auto" else eps
    step = torch.linalg.solve(eye + eps * D, g_bar) if mode == "exact" else g_bar - eps * D @ g_bar
    return flat(case.model) - lr * step, eps


def loss_and_backward(case):
    loss = per_sample_loss(case.loss)(case.model(case.x), case.y).mean()
    loss.backward()
    return loss


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


ATTACHED = [n for n in CASE_NAMES if n not in CAPTURE_REFUSED]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize("name", ATTACHED)
def test_update_equals_dense_update_on_every_zoo_model(name, mode, fused):
    """Two steps of the ordinary loop; the second (fused, if asked: the first is the checked
    unfused one) equals the update from dense per-sample gradients at that point."""
    case = make_case(name)
    opt = DiffusionMetricSGD(case.model, lr=0.1, eps="auto", inverse=mode, fused=fused)
    assert opt.attached and opt.fused == fused
    loss_and_backward(case)
    opt.step()
    opt.zero_grad()
    expected, eps_used = dense_update(case, "auto", mode, lr=0.1)
    loss_and_backward(case)
    if fused:
        assert all(isinstance(p.grad, NoGrad) for p in case.model.parameters() if p.requires_grad)
    opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == pytest.approx(eps_used, rel=1e-9)


@pytest.mark.parametrize("eps", ["auto", "fixed"])
@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize("name", ["mlp-relu", "small-cnn", "transformer", "partly-frozen"])
def test_matrix_free_route_equals_dense_update(name, mode, eps, monkeypatch):
    """The route the cost model picks for large batches (c by a JVP, λ_max by Lanczos on the
    operator K, the exact solve by conjugate gradients), forced here, fused from the second
    step: the same update as the dense reference, and no Gram matrix formed."""
    case = make_case(name)
    monkeypatch.setattr(DiffusionMetricSGD, "_matrix_free_pays", lambda *_: True)
    eps_value = "auto" if eps == "auto" else 0.3 / float(dense_diffusion(_rows(case)).trace())
    opt = DiffusionMetricSGD(case.model, lr=0.1, eps=eps_value, inverse=mode)
    loss_and_backward(case)
    opt.step()
    opt.zero_grad()
    expected, eps_used = dense_update(case, eps_value, mode, lr=0.1)
    loss_and_backward(case)
    monkeypatch.setattr(
        DiffusionMatrix, "gram", lambda self: pytest.fail("the Gram matrix was formed")
    )
    opt.step()
    assert opt.solver == "matrix-free" and opt.fused
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == pytest.approx(eps_used, rel=1e-9)


@pytest.mark.parametrize(
    ("widths", "batch", "eps", "route"),
    [
        ((3, 4, 2), 64, 1e-3, "matrix-free"),  # B² (in + out) > 2 B in out: products pay
        ((3, 4, 2), 16, "auto", "gram"),  # 20 Lanczos steps of 2 products each do not
        ((3, 4, 2), 64, 1e3, "gram"),  # ε tr D >= 1: the Cholesky check forms K anyway
        ((40, 40, 40), 8, 1e-3, "gram"),  # wide layers, small batch: the Gram matrix pays
    ],
)
def test_the_route_follows_the_cost_of_each(widths, batch, eps, route):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])
    ).double()
    x, y = torch.randn(batch, widths[0], dtype=torch.float64), torch.randint(0, 2, (batch,))
    opt = DiffusionMetricSGD(model, lr=0.1, eps=eps)
    for _ in range(2):  # the first step is the checked unfused one
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if eps == 1e3:
            with pytest.raises(ValueError, match="at or above 1/λ_max"):
                opt.step()
            return
        opt.step()
    assert opt.solver == route


def _rows(case):
    return per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)


@pytest.mark.parametrize("eps", ["auto", "fixed"])
@pytest.mark.parametrize("name", ["mlp-relu", "small-cnn", "layernorm"])
def test_fixed_and_auto_eps_on_the_first_step(name, eps):
    case = make_case(name)
    eps_value = "auto" if eps == "auto" else 0.8 / _lambda_max(case)
    expected, _ = dense_update(case, eps_value, "exact")
    opt = DiffusionMetricSGD(case.model, lr=1.0, eps=eps_value, inverse="exact")
    loss_and_backward(case)
    opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fused", [False, True])
def test_an_extra_forward_or_a_no_grad_forward_is_ignored(fused):
    case, other = make_case("transformer"), make_case("transformer", seed=1)
    opt = DiffusionMetricSGD(case.model, lr=0.1, inverse="exact", fused=fused)
    for step in range(2):
        if step == 1:
            expected, _ = dense_update(case, "auto", "exact", lr=0.1)
        opt.zero_grad()
        loss = per_sample_loss(case.loss)(case.model(case.x), case.y).mean()
        case.model(other.x)  # an evaluation inside the loop: never backpropagated
        with torch.no_grad():
            case.model(other.x)
        loss.backward()
        opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("extra_forward", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_steps_with_the_union_of_the_micro_batches(fused, extra_forward):
    """With ``extra_forward``, an evaluation forward as large as the first micro-batch
    follows each one: dropped beside the reached passes (a crash once: passes were compared
    by value)."""
    case = make_case("resnet-gn")
    opt = DiffusionMetricSGD(case.model, lr=0.1, inverse="exact", fused=fused)
    halves = [slice(0, 4), slice(4, 7)]  # unequal micro-batches of the 7 samples
    for step in range(2):
        if step == 1:
            expected, _ = dense_update(case, "auto", "exact", lr=0.1)
        opt.zero_grad()
        for part in halves:
            losses = per_sample_loss(case.loss)(case.model(case.x[part]), case.y[part])
            (losses.sum() / len(case.x)).backward()  # the mean over the union
            if extra_forward:
                case.model(case.x[:4])  # never backpropagated
        opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


def test_tied_weights_are_named_and_the_closure_route_is_exact():
    case = make_case("tied-autoencoder")
    expected, _ = dense_update(case, "auto", "weak")
    opt = DiffusionMetricSGD(case.model, lr=1.0)
    loss_and_backward(case)
    before = flat(case.model)
    with pytest.raises(CoverageError, match=r"enc\.weight.*outside the forward.*step\(closure\)"):
        opt.step()
    assert torch.equal(flat(case.model), before)  # nothing moved
    assert all("forward" not in m.__dict__ for m in case.model.modules())  # hooks gone
    case.model.zero_grad()
    opt.step(lambda: per_sample_loss(case.loss)(case.model(case.x), case.y))
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


def test_tied_weights_on_the_closure_route_take_the_matrix_free_weak_step_exactly():
    """Stored rows make c = G ḡ one matrix-vector product (B d) against the Gram matrix's
    B² d, so the weak step with a small fixed ε leaves the Gram route by itself."""
    case = make_case("tied-autoencoder")
    eps = 0.3 / float(dense_diffusion(_rows(case)).trace())
    expected, _ = dense_update(case, eps, "weak")
    opt = DiffusionMetricSGD(list(case.model.parameters()), lr=1.0, eps=eps)
    opt.step(lambda: per_sample_loss(case.loss)(case.model(case.x), case.y))
    assert opt.solver == "matrix-free"
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", [6, 5])
def test_a_layer_whose_dim_0_is_not_the_samples_is_named(length):
    """Sequence-first inside the model: with T = B no shape gives it away, and the sums the
    first check compares are equal; the randomly weighted sample check still fails."""
    case = make_case("sequence-first")
    case.x = case.x[:, :length]
    opt = DiffusionMetricSGD(case.model, lr=0.1)
    loss_and_backward(case)
    before = flat(case.model)
    with pytest.raises(CoverageError, match=r"another axis than dim 0.*step\(closure\)"):
        opt.step()
    assert torch.equal(flat(case.model), before)


def test_fused_refuses_a_gradient_from_outside_its_layers():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = per_sample_loss(case.loss)(case.model(case.x), case.y).mean()
        if opt._capture.fusing:  # a penalty on the weights reaches .grad directly
            loss = loss + 0.1 * case.model.fc1.weight.square().sum()
        loss.backward()
        if opt._capture.fusing:
            with pytest.raises(RuntimeError, match=r"fc1\.weight received a gradient.*fused"):
                opt.step()
        else:
            opt.step()


def test_fused_step_without_a_backward_is_an_error():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1)
    loss_and_backward(case)
    opt.step()
    assert opt._capture.fusing
    case.model(case.x)  # forward, no backward
    with pytest.raises(RuntimeError, match="no backward through the model"):
        opt.step()


def test_batchnorm_in_train_mode_is_refused_on_both_routes():
    case = make_case("resnet-bn-eval")
    case.model.train()
    opt = DiffusionMetricSGD(case.model, lr=0.1)
    loss_and_backward(case)
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm layer 'stem_norm'.*GroupNorm"):
        opt.step()
    opt.detach()
    with pytest.raises(UnsupportedModelError, match="BatchNorm layer 'stem_norm'"):
        opt.step(lambda: per_sample_loss(case.loss)(case.model(case.x), case.y))


def test_parameters_instead_of_the_model_get_the_true_reason():
    mlp = make_case("mlp-relu").model
    opt = DiffusionMetricSGD(mlp.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="given parameters, not the model"):
        opt.step()


def test_fused_detach_gives_the_layers_their_weight_gradients_back():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1, fused="on")
    loss_and_backward(case)
    opt.step()
    case.model.zero_grad(set_to_none=True)
    loss_and_backward(case)
    assert all(isinstance(p.grad, NoGrad) for p in case.model.parameters() if p.requires_grad)
    opt.detach()
    loss_and_backward(case)
    assert all(p.grad is not None for p in case.model.parameters())
    assert all("forward" not in m.__dict__ for m in case.model.modules())


def test_fused_arguments_are_checked():
    with pytest.raises(ValueError, match="needs the model itself"):
        DiffusionMetricSGD(list(make_case("mlp-relu").model.parameters()), lr=0.1, fused="on")
    with pytest.raises(ValueError, match="Invalid fused"):
        DiffusionMetricSGD(make_case("mlp-relu").model, lr=0.1, fused="yes")


def test_fixed_eps_just_below_one_over_lambda_max_is_accepted():
    """A fixed ε with ε tr D >= 1 is checked by a Cholesky factorisation of I − εK."""
    case = make_case("mlp-relu")
    lam = _lambda_max(case)
    opt = DiffusionMetricSGD(case.model, lr=0.0, eps=0.999 / lam, fused="on")
    loss_and_backward(case)
    opt.step()
    assert opt.stats["eps"] * opt.stats["trace"] >= 1  # the Cholesky path decided
    opt = DiffusionMetricSGD(case.model, lr=0.0, eps=1.001 / lam, fused="on")
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
    opt = DiffusionMetricSGD(case.model, lr=1.0, eps="auto", inverse="exact")
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
    opt = DiffusionMetricSGD(case.model, lr=0.05, momentum=0.9, inverse="exact")
    loss_and_backward(case)
    opt.step()
    other = DiffusionMetricSGD(twin.model, lr=0.05, momentum=0.9, inverse="exact")
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
    assert other.state_dict()["param_groups"][0]["inverse"] == "exact"


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
    with pytest.raises(ValueError, match="Invalid inverse"):
        DiffusionMetricSGD(model, lr=0.1, inverse="strong")
    with pytest.raises(ValueError, match="Invalid eps"):
        DiffusionMetricSGD(model, lr=0.1, eps="small")
    with pytest.raises(ValueError, match="Invalid eps_fraction"):
        DiffusionMetricSGD(model, lr=0.1, eps_fraction=2)
    with pytest.raises(ValueError, match="Nesterov"):
        DiffusionMetricSGD(model, lr=0.1, nesterov=True)
    opt = DiffusionMetricSGD(model, lr=0.1)
    model.weight.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="no backward through the model"):
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
    opt = DiffusionMetricSGD([x], lr=lr, inverse=mode, momentum=0.5)
    first = None
    for step in range(steps):
        losses_of = problem(step)  # a new minibatch of noise every step
        loss = opt.step(lambda losses_of=losses_of: losses_of(x))
        first = float(loss) if first is None else first
    final = float(problem(10_000)(x.detach()).mean())
    assert final < 0.1 * first, (first, final)


DDP_CASES = ("mlp-relu", "transformer", "transformer")


def _ddp_worker(rank, world, results, mode):
    from sgdgeom.persample import capture

    flats = []
    for k, name in enumerate(DDP_CASES):  # the attached route: captures all-gathered
        # the second transformer keeps no rows: its layers' own calls are gathered
        capture.ROWS_LIMIT = 0 if k == 2 else 2**28
        case = make_case(name)
        half = len(case.x) // world
        x, y = case.x[rank * half : (rank + 1) * half], case.y[rank * half : (rank + 1) * half]
        model = nn.parallel.DistributedDataParallel(case.model)
        opt = DiffusionMetricSGD(model, lr=1.0, eps="auto", inverse=mode)
        assert opt.attached and not opt.fused  # fused="auto" is off under DDP
        per_sample_loss(case.loss)(model(x), y).mean().backward()
        opt.step()
        flats.append(flat(case.model))
    # the closure route on parameters: the rows of G are all-gathered
    plain = make_case("tied-autoencoder")
    xs, ys = plain.x[rank * 4 : (rank + 1) * 4], plain.y[rank * 4 : (rank + 1) * 4]
    closure_opt = DiffusionMetricSGD(plain.model.parameters(), lr=1.0, inverse=mode)
    closure_opt.step(lambda: nn.functional.cross_entropy(plain.model(xs), ys, reduction="none"))
    flats.append(flat(plain.model))
    if rank == 0:
        torch.save(flats, results)


@pytest.mark.parametrize("mode", ["weak", "exact"])
def test_ddp_uses_the_global_batch(tmp_path, mode):
    """Two gloo processes, each with half the batch, step as one process on the whole."""
    results = tmp_path / "rank0.pt"
    spawn(_ddp_worker, tmp_path, str(results), mode)
    *ddp_flats, closure_flat = torch.load(results)
    for name, ddp_flat in zip(DDP_CASES, ddp_flats, strict=True):
        case = make_case(name)
        n = len(case.x) // 2 * 2
        case.x, case.y = case.x[:n], case.y[:n]
        opt = DiffusionMetricSGD(case.model, lr=1.0, eps="auto", inverse=mode)
        loss_and_backward(case)
        opt.step()
        torch.testing.assert_close(ddp_flat, flat(case.model), rtol=0, atol=1e-6)
    plain = make_case("tied-autoencoder")
    opt = DiffusionMetricSGD(plain.model.parameters(), lr=1.0, inverse=mode)
    opt.step(lambda: nn.functional.cross_entropy(plain.model(plain.x), plain.y, reduction="none"))
    torch.testing.assert_close(closure_flat, flat(plain.model), rtol=0, atol=1e-6)


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
