"""Test cases as data: (model factory, loss, data, seed), served to every operator test.

The zoo covers the papers' models and the unusual ones: normalisation layers, attention,
Conv1d, a tied weight used outside its module, a layer called twice, partly frozen layers,
a layer output changed in place, and a functional loss. Every case is float64 and small
enough for dense references.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from sgdgeom.models import build_model
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


def _case(name: str, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss = "cross_entropy"
    if name == "mlp-relu":
        model = build_model("mlp", (6,), 3, widths=(7, 5), activation="relu")
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    elif name == "mlp-tanh":
        model = build_model("mlp", (1, 3, 3), 4, widths=(6,), activation="tanh")
        x, y = torch.randn(9, 1, 3, 3, generator=g), torch.randint(0, 4, (9,), generator=g)
    elif name == "small-cnn":
        model = build_model("small-cnn", (2, 6, 6), 3, channels=3)
        model.conv2.bias = None
        x, y = torch.randn(7, 2, 6, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
    elif name == "mse-regression":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        x = torch.randn(10, 4, generator=g)
        y = torch.randn(10, 2, generator=g)
        loss = "mse"
    elif name == "sequence":
        model = SequenceNet()
        x, y = torch.randn(8, 5, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
    elif name == "layernorm":
        model = NormNet()
        x, y = torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g)
    elif name == "resnet-gn":
        model = build_model("resnet-gn", (2, 5, 5), 3, channels=4, blocks=1, groups=2)
        x, y = torch.randn(7, 2, 5, 5, generator=g), torch.randint(0, 3, (7,), generator=g)
    elif name == "resnet-bn-eval":
        model = _randomise_batchnorm(
            build_model("resnet-bn", (2, 5, 5), 3, channels=4, blocks=1), g
        )
        x, y = torch.randn(7, 2, 5, 5, generator=g), torch.randint(0, 3, (7,), generator=g)
    elif name == "transformer":
        model = build_model("transformer", (5,), 3, dim=8, depth=2, heads=2, vocab=7).eval()
        x, y = torch.randint(0, 7, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    elif name == "conv1d":
        model = Conv1dNet()
        x, y = torch.randn(7, 2, 7, generator=g), torch.randint(0, 3, (7,), generator=g)
    elif name == "tied-autoencoder":
        model = TiedAutoencoder()
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    elif name == "reused-linear":
        model = ReusedLinear()
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    elif name == "partly-frozen":
        model = build_model("mlp", (6,), 3, widths=(5, 4), activation="tanh")
        model.fc1.weight.requires_grad_(False)  # its bias trains
        model.out.bias.requires_grad_(False)  # its weight trains
        x, y = torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g)
    elif name == "sequence-first":
        model = SequenceFirst()
        x, y = torch.randn(6, 6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    elif name == "inplace-relu":  # a layer output changed in place after the layer
        model = nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
        )
        x, y = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    elif name == "functional-loss":
        model = build_model("mlp", (4,), 3, widths=(5,), activation="tanh")
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = functools.partial(F.cross_entropy, label_smoothing=0.1)
    else:
        raise KeyError(name)
    x = x if x.dtype == torch.int64 else x.double()
    return Case(name, model.double(), loss, x, y.double() if loss == "mse" else y)


CASE_NAMES = [
    "mlp-relu",
    "mlp-tanh",
    "small-cnn",
    "mse-regression",
    "sequence",
    "layernorm",
    "resnet-gn",
    "resnet-bn-eval",
    "transformer",
    "conv1d",
    "tied-autoencoder",
    "reused-linear",
    "partly-frozen",
    "inplace-relu",
    "sequence-first",
    "functional-loss",
]
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
            "monitor": {"temperature": False, **monitor},
        }
    )
    run_training(config, out, progress=False)
    return read_jsonl(out / "metrics.jsonl")
