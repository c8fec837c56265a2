"""Test cases as data: (model factory, loss, data, seed), served to every operator test.

The zoo covers the papers' models and the unusual ones: normalisation layers, attention,
Conv1d, a tied weight used outside its module, a layer called twice, partly frozen layers,
a layer output changed in place, and a functional loss. Every case is float64 and small
enough for dense references.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sgdgeom.models import build_model
from sgdgeom.persample import LossSpec
from tests.reference import Case


class SequenceNet(nn.Module):
    """A Linear layer applied along a sequence (T > 1), then mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.out = nn.Linear(5, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x))).mean(1)


class NormNet(nn.Module):
    """An MLP with a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.fc1(x))))


class Conv1dNet(nn.Module):
    """Two Conv1d layers (one strided, without bias) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv1d(3, 3, 3, stride=2, dilation=1, bias=False)
        self.out = nn.Linear(3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.out(h.flatten(1))


class TiedAutoencoder(nn.Module):
    """Encoder weight reused, transposed, as the decoder: used outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reconstruction = F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())
        return self.out(torch.tanh(reconstruction))


class SequenceFirst(nn.Module):
    """Batch-first input, but a Linear applied to the sequence-first transpose (T, B, F):
    the layer's dim 0 is not the samples. With T = B no shape gives it away."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x.transpose(0, 1))).mean(0))


class ReusedLinear(nn.Module):
    """One Linear called twice in a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _randomise_batchnorm(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=g))
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.num_features, generator=g))
                module.bias.copy_(torch.randn(module.num_features, generator=g))
    return model.eval()


Builder = Callable[[torch.Generator], tuple[nn.Module, LossSpec, torch.Tensor, torch.Tensor]]
CASES: dict[str, Builder] = {}
"""The zoo: a case's name to its builder ``generator -> (model, loss, x, y)`` (the model is
made under the case's seed; ``x`` and ``y`` come from the generator)."""


def case(name: str) -> Callable[[Builder], Builder]:
    """Register a case of the zoo under ``name``."""

    def register(builder: Builder) -> Builder:
        CASES[name] = builder
        return builder

    return register


def _classes(g: torch.Generator, n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=g)


@case("mlp-relu")
def _mlp_relu(g):
    model = build_model("mlp", (6,), 3, widths=(7, 5), activation="relu")
    return model, "cross_entropy", torch.randn(12, 6, generator=g), _classes(g, 12, 3)


@case("mlp-tanh")
def _mlp_tanh(g):
    model = build_model("mlp", (1, 3, 3), 4, widths=(6,), activation="tanh")
    return model, "cross_entropy", torch.randn(9, 1, 3, 3, generator=g), _classes(g, 9, 4)


@case("small-cnn")
def _small_cnn(g):
    model = build_model("small-cnn", (2, 6, 6), 3, channels=3)
    model.conv2.bias = None
    return model, "cross_entropy", torch.randn(7, 2, 6, 6, generator=g), _classes(g, 7, 3)


@case("mse-regression")
def _mse_regression(g):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    return model, "mse", torch.randn(10, 4, generator=g), torch.randn(10, 2, generator=g)


@case("sequence")
def _sequence(g):
    return SequenceNet(), "cross_entropy", torch.randn(8, 5, 3, generator=g), _classes(g, 8, 4)


@case("layernorm")
def _layernorm(g):
    return NormNet(), "cross_entropy", torch.randn(9, 6, generator=g), _classes(g, 9, 3)


@case("resnet-gn")
def _resnet_gn(g):
    model = build_model("resnet-gn", (2, 5, 5), 3, channels=4, blocks=1, groups=2)
    return model, "cross_entropy", torch.randn(7, 2, 5, 5, generator=g), _classes(g, 7, 3)


@case("resnet-bn-eval")
def _resnet_bn_eval(g):
    model = _randomise_batchnorm(build_model("resnet-bn", (2, 5, 5), 3, channels=4, blocks=1), g)
    return model, "cross_entropy", torch.randn(7, 2, 5, 5, generator=g), _classes(g, 7, 3)


@case("transformer")
def _transformer(g):
    model = build_model("transformer", (5,), 3, dim=8, depth=2, heads=2, vocab=7).eval()
    return model, "cross_entropy", torch.randint(0, 7, (6, 5), generator=g), _classes(g, 6, 3)


@case("conv1d")
def _conv1d(g):
    return Conv1dNet(), "cross_entropy", torch.randn(7, 2, 7, generator=g), _classes(g, 7, 3)


@case("tied-autoencoder")
def _tied_autoencoder(g):
    return TiedAutoencoder(), "cross_entropy", torch.randn(8, 6, generator=g), _classes(g, 8, 3)


@case("reused-linear")
def _reused_linear(g):
    return ReusedLinear(), "cross_entropy", torch.randn(8, 5, generator=g), _classes(g, 8, 3)


@case("partly-frozen")
def _partly_frozen(g):
    model = build_model("mlp", (6,), 3, widths=(5, 4), activation="tanh")
    model.fc1.weight.requires_grad_(False)  # its bias trains
    model.out.bias.requires_grad_(False)  # its weight trains
    return model, "cross_entropy", torch.randn(9, 6, generator=g), _classes(g, 9, 3)


@case("inplace-relu")
def _inplace_relu(g):  # a layer output changed in place after the layer
    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )
    return model, "cross_entropy", torch.randn(9, 4, generator=g), _classes(g, 9, 3)


@case("sequence-first")
def _sequence_first(g):
    return SequenceFirst(), "cross_entropy", torch.randn(6, 6, 3, generator=g), _classes(g, 6, 3)


@case("functional-loss")
def _functional_loss(g):
    model = build_model("mlp", (4,), 3, widths=(5,), activation="tanh")
    loss = functools.partial(F.cross_entropy, label_smoothing=0.1)
    return model, loss, torch.randn(8, 4, generator=g), _classes(g, 8, 3)


def _case(name: str, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name not in CASES:
        raise KeyError(name)
    model, loss, x, y = CASES[name](g)
    x = x if x.dtype == torch.int64 else x.double()
    return Case(name, model.double(), loss, x, y.double() if loss == "mse" else y)


CASE_NAMES = list(CASES)
# Cases the capture route must refuse (a weight used outside its module, a layer whose dim 0
# is not the samples): they take the generic route, and route="capture" raises an error
# naming the parameter.
CAPTURE_REFUSED = {"tied-autoencoder", "sequence-first"}


def make_case(name: str, seed: int = 0) -> Case:
    return _case(name, seed)


def routes_for(name: str) -> list[str]:
    """The routes that must accept the case (and be exact on it)."""
    return ["generic"] if name in CAPTURE_REFUSED else ["capture", "generic"]


def train_digits_with_monitor(out, monitor: dict) -> list[dict]:
    """One-layer MLP, 2 epochs of SGD on 128 digits, with these monitor options: the
    records of ``metrics.jsonl``."""
    from sgdgeom.experiments.config import parse_config
    from sgdgeom.experiments.runner import run_training
    from sgdgeom.files import read_jsonl

    config = parse_config(
        {
            "name": "monitored",
            "data": {"name": "digits", "batch_size": 32, "n_train": 128, "n_test": 64},
            "model": {"name": "mlp", "widths": [8]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 2, "device": "cpu"},
            "monitor": monitor,
        }
    )
    run_training(config, out, progress=False)
    return read_jsonl(out / "metrics.jsonl")
