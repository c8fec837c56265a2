"""Every registered entry is reachable by name: each optimizer, training loss and monitor
from an experiment config, each plot kind from a sweep, each experiment kind from the
command line. Every optimizer keeps the torch.optim contract (the loss falls on a quadratic
and on Rosenbrock, a state_dict round trip, no step without gradients, its errors).

A new registration without an example here fails ``test_every_entry_has_an_example``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from sgdgeom.cli import app
from sgdgeom.errors import MissingExtraError
from sgdgeom.experiments import KINDS
from sgdgeom.experiments.config import parse_config
from sgdgeom.experiments.plots import PLOTS
from sgdgeom.experiments.runner import run_training
from sgdgeom.experiments.sweep import SweepConfig, expand_sweep, run_sweep
from sgdgeom.files import read_jsonl
from sgdgeom.monitors import MONITORS
from sgdgeom.optim import LOSSES, OPTIMIZERS, optimizer_options
from sgdgeom.registry import Registry

OPTIMIZER_EXAMPLES = {
    # name: (options beyond the name, a learning rate that trains the problems below)
    "sgd": ({"momentum": 0.9}, 0.05),
    "adam": ({}, 0.05),
    "adamw": ({"weight_decay": 0.01}, 0.05),
    "sam": ({"momentum": 0.9}, 0.05),
    "asam": ({"momentum": 0.9}, 0.05),
    "entropy-sgd": ({"L": 3, "gamma": 0.3, "langevin_lr": 0.05, "noise": 0.0}, 1.0),
    "lion": ({"betas": [0.9, 0.99]}, 0.02),
    "diffusion-metric-sgd": ({"inverse": "exact", "momentum": 0.9}, 0.05),
}
LOSS_EXAMPLES = {
    "cross_entropy": {},
    "pla": {"R": 0.05, "y": 2, "layers": ["out"]},
    "plea": {"R": 0.05, "y": 2},
}
MONITOR_EXAMPLES = {
    # name: (options, a metric key each epoch it runs records; None: it writes files only)
    "temperature": ({"snr": True, "trace_every": 1}, "temperature/fc1/signal"),
    "alignment": ({"every": 1, "k": 2}, "alignment/cosine"),
    "current": ({"every": 1, "probes": 2, "sections": 1}, "current/ratio"),
    "spectrum": ({"every": 1, "k": 3}, "spectrum/lambda_max"),
    "noise_scale": ({"every": 2}, "noise/b_noise_smoothed"),
    "tensorboard": ({}, None),
}
PLOT_EXAMPLES = {"versus": {"x": "loss.R"}, "curves": {}}
HAND_WRITTEN_COMMANDS = {"datasets", "train", "compare", "sweep", "report"}

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 32, "n_train": 96, "n_test": 64},
    "model": {"name": "mlp", "widths": [8]},
    "train": {"epochs": 2, "device": "cpu"},
}


@pytest.mark.parametrize(
    ("registry", "examples"),
    [
        (OPTIMIZERS, OPTIMIZER_EXAMPLES),
        (LOSSES, LOSS_EXAMPLES),
        (MONITORS, MONITOR_EXAMPLES),
        (PLOTS, PLOT_EXAMPLES),
    ],
    ids=["optimizers", "losses", "monitors", "plots"],
)
def test_every_entry_has_an_example(registry: Registry, examples: dict):
    assert set(registry) == set(examples)


def test_an_unknown_name_lists_the_known_ones():
    from sgdgeom.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'; known: sgd, adam"):
        parse_config({**TINY, "optimizer": {"name": "lamb", "lr": 0.1}})
    with pytest.raises(ConfigError, match="unknown loss 'hinge'; known: cross_entropy"):
        parse_config({**TINY, "optimizer": {"name": "sgd", "lr": 0.1}, "loss": {"name": "hinge"}})


@pytest.mark.parametrize("name", list(OPTIMIZER_EXAMPLES))
def test_every_optimizer_trains_from_a_config(tmp_path, name):
    options, lr = OPTIMIZER_EXAMPLES[name]
    config = parse_config({**TINY, "optimizer": {"name": name, "lr": lr, **options}})
    assert type(config.optimizer) is OPTIMIZERS[name]
    final = run_training(config, tmp_path, progress=False)
    assert final["epochs"] == 2 and math.isfinite(final["final_train_loss"])


@pytest.mark.parametrize("name", list(LOSS_EXAMPLES))
def test_every_loss_trains_from_a_config(tmp_path, name):
    config = parse_config(
        {
            **TINY,
            "optimizer": {"name": "sgd", "lr": 0.1},
            "loss": {"name": name, **LOSS_EXAMPLES[name]},
        }
    )
    assert type(config.loss) is LOSSES[name]
    assert math.isfinite(run_training(config, tmp_path, progress=False)["final_train_loss"])


@pytest.mark.parametrize("name", list(MONITOR_EXAMPLES))
def test_every_monitor_records_from_a_config(tmp_path, name):
    options, key = MONITOR_EXAMPLES[name]
    config = parse_config(
        {
            **TINY,
            "optimizer": {"name": "sgd", "lr": 0.1},
            "monitor": {"probe_size": 16, name: options},
        }
    )
    if name == "tensorboard":  # an optional package: present, it writes; absent, it is named
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            with pytest.raises(MissingExtraError, match="pip install tensorboard"):
                run_training(config, tmp_path, progress=False)
            return
        run_training(config, tmp_path, progress=False)
        assert any((tmp_path / "tensorboard").iterdir())
        return
    run_training(config, tmp_path, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(key in record for record in records)


def test_every_plot_kind_draws_from_a_sweep_store(tmp_path):
    plots = [{"kind": kind, **options} for kind, options in PLOT_EXAMPLES.items()]
    sweep = SweepConfig(
        name="plots",
        base={**TINY, "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 1}},
        variants={
            "none": {},
            "pla": {"loss": {"name": "pla", "y": 1}, "grid": {"loss.R": [0.01, 0.1]}},
        },
        plots=plots,
    )
    spec = expand_sweep(sweep, tmp_path, "test")
    assert [type(p) for p in spec.plots] == [PLOTS[kind] for kind in PLOT_EXAMPLES]
    run_sweep(spec, tmp_path, workers=1, progress=False)
    from sgdgeom.experiments.plots import plot_sweep
    from sgdgeom.experiments.store import ResultStore

    made = plot_sweep(ResultStore(tmp_path / "results.sqlite"), "plots", plots, tmp_path / "fig")
    assert len(made) == len(plots) and all(p.stat().st_size > 10_000 for p in made)


def test_every_experiment_kind_is_a_command():
    runner = CliRunner()
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(KINDS) | HAND_WRITTEN_COMMANDS <= commands
    for name in KINDS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert KINDS[name].help.split()[0] in result.output


# --------------------------------------------------------------------------- the contract


class Regression(nn.Module):
    """Least squares of a Linear layer: a quadratic in the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Rosenbrock(nn.Module):
    """Noisy Rosenbrock in the two weights of a Linear layer, ``(a_i − p₁)² + 5(p₂ − p₁² +
    b_i)²`` per sample (the layer maps the constant input 1 to ``p``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.5]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def rosenbrock_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((target[:, 0] - p[:, 0]) ** 2 + 5 * (p[:, 1] - p[:, 0] ** 2 + target[:, 1]) ** 2).mean()


def problem(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "quadratic":
        model = Regression().double()
        x = torch.randn(32, 3, generator=g, dtype=torch.float64)
        y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
        return model, x, y, lambda out, t: ((out - t) ** 2).sum(1).mean()
    model = Rosenbrock().double()
    noise = torch.randn(32, 2, generator=g, dtype=torch.float64)
    target = torch.stack([1 + 0.1 * noise[:, 0], 0.05 * noise[:, 1]], 1)
    return model, torch.ones(32, 1, dtype=torch.float64), target, rosenbrock_loss


def train(optimizer, model, x, y, loss_fn, steps: int) -> list[float]:
    """The Trainer's step: zero_grad, loss, backward, step (with a closure where needed)."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        if getattr(optimizer, "requires_closure", False):

            def closure():
                optimizer.zero_grad(set_to_none=True)
                value = loss_fn(model(x), y)
                value.backward()
                return value

            optimizer.step(closure)
        else:
            optimizer.step()
    return losses


def build(name: str, model: nn.Module, lr_scale: float = 1.0):
    options, lr = OPTIMIZER_EXAMPLES[name]
    return optimizer_options({"name": name, "lr": lr * lr_scale, **options}).build(model)


@pytest.mark.parametrize("kind", ["quadratic", "rosenbrock"])
@pytest.mark.parametrize("name", list(OPTIMIZER_EXAMPLES))
def test_the_loss_falls(name, kind):
    model, x, y, loss_fn = problem(kind)
    rosenbrock = (1.0 if name == "lion" else 0.2, 150, 0.75)  # a sign step moves lr a step
    scale, steps, fall = rosenbrock if kind == "rosenbrock" else (1.0, 60, 0.5)
    losses = train(build(name, model, scale), model, x, y, loss_fn, steps)
    assert all(math.isfinite(v) for v in losses)
    assert max(losses[-10:]) < fall * losses[0], losses[:: steps // 6]


@pytest.mark.parametrize("name", list(OPTIMIZER_EXAMPLES))
def test_a_state_dict_round_trip_continues_the_same_run(name):
    model, x, y, loss_fn = problem("quadratic")
    optimizer = build(name, model)
    train(optimizer, model, x, y, loss_fn, 3)
    twin = copy.deepcopy(model)
    twin_optimizer = build(name, twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(optimizer, model, x, y, loss_fn, 2)
    train(twin_optimizer, twin, x, y, loss_fn, 2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "name", [n for n in OPTIMIZER_EXAMPLES if n not in ("sam", "asam", "entropy-sgd")]
)
def test_no_gradient_no_step(name):
    model, *_ = problem("quadratic")
    optimizer = build(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("name", list(OPTIMIZER_EXAMPLES))
def test_bad_options_are_refused_by_name(name):
    with pytest.raises(ValidationError, match="greater than 0"):
        optimizer_options({"name": name, "lr": -1.0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        optimizer_options({"name": name, "lr": 0.1, "warmup": 3})
