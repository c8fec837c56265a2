"""The baselines: Entropy-SGD against Algorithm 1 written out by hand, SAM and ASAM through
the Trainer's closure, and their configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgdgeom.data import Dataset
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import parse_config
from sgdgeom.experiments.runner import run_training
from sgdgeom.optim.entropy_sgd import EntropySGD
from sgdgeom.train import Trainer


def tiny_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    return model, x, y


def loss_at(model, params, x, y):
    out = torch.func.functional_call(model, params, (x,))
    return nn.functional.cross_entropy(out, y)


def reference_entropy_sgd(model, x, y, *, lr, langevin_lr, L, gamma, gamma_growth, alpha,
                          momentum, steps, noise=0.0, seed=0):  # fmt: skip
    """Algorithm 1 of Chaudhari et al. (2017), on dicts of tensors."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: None for k in params}
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        g_t = gamma * (1 + gamma_growth) ** t
        inner = {k: v.clone() for k, v in params.items()}
        mu = {k: v.clone() for k, v in params.items()}
        for _ in range(L):
            leaves = {k: v.clone().requires_grad_(True) for k, v in inner.items()}
            grads = torch.autograd.grad(loss_at(model, leaves, x, y), list(leaves.values()))
            for (k, v), grad in zip(inner.items(), grads, strict=True):
                step = grad - g_t * (params[k] - v)
                v = v - langevin_lr * step
                if noise:
                    v = v + math.sqrt(langevin_lr) * noise * torch.randn(
                        v.shape, generator=gen, dtype=v.dtype
                    )
                inner[k] = v
                mu[k] = (1 - alpha) * mu[k] + alpha * v
        for k in params:
            direction = g_t * (params[k] - mu[k])
            if momentum:
                buffers[k] = direction if buffers[k] is None else momentum * buffers[k] + direction
                direction = buffers[k]
            params[k] = params[k] - lr * direction
    return params


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_entropy_sgd_equals_algorithm_1(momentum):
    model, x, y = tiny_problem()
    hyper = dict(lr=5.0, langevin_lr=0.2, L=4, gamma=0.1, gamma_growth=0.01, alpha=0.75)
    expected = reference_entropy_sgd(model, x, y, momentum=momentum, steps=3, **hyper)
    opt = EntropySGD(model.parameters(), noise=0.0, momentum=momentum, **hyper)

    def closure():
        opt.zero_grad()
        loss = loss_at(model, dict(model.named_parameters()), x, y)
        loss.backward()
        return loss

    for _ in range(3):
        closure()
        opt.step(closure)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12)


def test_entropy_sgd_noise_is_the_sgld_noise():
    model, x, y = tiny_problem(1)
    hyper = dict(lr=2.0, langevin_lr=0.1, L=3, gamma=0.2, gamma_growth=0.0, alpha=0.5)
    torch.manual_seed(5)
    generator_state = torch.get_rng_state()
    expected = reference_entropy_sgd(model, x, y, momentum=0.0, steps=1, noise=0.01, seed=5,
                                     **hyper)  # fmt: skip
    torch.set_rng_state(generator_state)
    opt = EntropySGD(model.parameters(), noise=0.01, **hyper)

    def closure():
        opt.zero_grad()
        loss = loss_at(model, dict(model.named_parameters()), x, y)
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12)


def test_entropy_sgd_validates_and_round_trips():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="L"):
        EntropySGD(model.parameters(), lr=1.0, L=0)
    with pytest.raises(ValueError, match="nesterov"):
        EntropySGD(model.parameters(), lr=1.0, nesterov=True)
    with pytest.raises(ValueError, match="closure"):
        EntropySGD(model.parameters(), lr=1.0).step()
    opt = EntropySGD(model.parameters(), lr=1.0)
    opt.param_groups[0]["outer_steps"] = 7
    other = EntropySGD(model.parameters(), lr=1.0)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["outer_steps"] == 7


@pytest.mark.parametrize("adaptive", [False, True])
def test_trainer_gives_sam_its_closure(adaptive):
    """One Trainer step with SAM/ASAM equals the update written out: ε = ρ T²g/‖Tg‖ with
    T = |w| for ASAM (Kwon et al. eq. 9) and 1 for SAM, then an SGD step with the gradient
    at w + ε."""
    model, x, y = tiny_problem(2)
    rho, lr = 0.05, 0.1
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    grads = dict(zip(w, torch.autograd.grad(loss_at(model, leaves, x, y), list(leaves.values())),
                     strict=True))  # fmt: skip
    scale = {k: (w[k].abs() if adaptive else torch.ones_like(w[k])) for k in w}
    norm = torch.sqrt(sum(((scale[k] * grads[k]) ** 2).sum() for k in w))
    shifted = {k: (w[k] + rho * scale[k] ** 2 * grads[k] / norm).requires_grad_(True) for k in w}
    adv = torch.autograd.grad(loss_at(model, shifted, x, y), list(shifted.values()))
    expected = {k: w[k] - lr * g for k, g in zip(w, adv, strict=True)}

    config = parse_config({
        "name": "sam", "data": {"name": "digits"}, "model": {"name": "mlp"},
        "optimizer": {"name": "asam" if adaptive else "sam", "lr": lr, "rho": rho},
        "train": {"epochs": 1},
    })  # fmt: skip
    optimizer = config.optimizer.build(model)
    dataset = Dataset("tiny", x, y, x, y, 2, torch.zeros(1), torch.ones(1))
    Trainer(model, dataset, optimizer, epochs=1, batch_size=8, device="cpu",
            progress=False).fit()  # fmt: skip
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-10)


def test_baseline_keys_belong_to_their_optimizer():
    base = {"name": "x", "data": {"name": "digits"}, "model": {"name": "mlp"},
            "train": {"epochs": 1}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer\.rho: unknown key; allowed: name, lr"):
        parse_config({**base, "optimizer": {"name": "sgd", "lr": 0.1, "rho": 0.1}})
    with pytest.raises(ConfigError, match=r"optimizer\.L: unknown key.*optimizer\.gamma"):
        parse_config({**base, "optimizer": {"name": "sam", "lr": 0.1, "L": 2, "gamma": 0.1}})


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sam", "lr": 0.05, "momentum": 0.9},
        {"name": "asam", "lr": 0.05, "momentum": 0.9},
        {"name": "entropy-sgd", "lr": 20.0, "L": 2, "langevin_lr": 0.1},
    ],
)
def test_baselines_train_and_resume(tmp_path, optimizer):
    config = parse_config({
        "name": "b", "seed": 0, "data": {"name": "digits", "batch_size": 32, "n_train": 256},
        "model": {"name": "mlp"}, "optimizer": optimizer, "train": {"epochs": 2, "device": "cpu"},
    })  # fmt: skip
    whole = run_training(config, tmp_path / "whole", progress=False)
    assert whole["final_test_acc"] > 0.3
    first = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    run_training(first, tmp_path / "half", progress=False)
    # a resumed run (optimizer state from the checkpoint) ends where the whole one does
    (tmp_path / "half" / "config.yaml").unlink()
    resumed = run_training(config, tmp_path / "half", resume=True, progress=False)
    assert resumed == whole


def test_entropy_sgd_config_keys_reach_the_optimizer():
    """alpha and noise are config keys (a fair comparison needs them); each reaches
    EntropySGD's param group, and alpha outside (0, 1] is refused by the config."""
    from sgdgeom.optim import optimizer_options

    model, _, _ = tiny_problem()
    config = optimizer_options(
        {"name": "entropy-sgd", "lr": 1.0, "alpha": 0.5, "noise": 0.01, "L": 3}
    )
    group = config.build(model).param_groups[0]
    assert (group["alpha"], group["noise"], group["L"]) == (0.5, 0.01, 3)
    with pytest.raises(ValueError, match="alpha"):
        optimizer_options({"name": "entropy-sgd", "lr": 1.0, "alpha": 1.5})
    with pytest.raises(ValueError, match="alpha"):
        optimizer_options({"name": "sgd", "lr": 1.0, "alpha": 0.5})
