"""Test cases as data: (model factory, loss, data, seed), served to every operator test."""

from __future__ import annotations

import torch
from torch import nn

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
    """An MLP with a LayerNorm: not supported by the fast route."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.fc1(x))))


def _case(name: str, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp-relu":
        model = build_model("mlp", (6,), 3, widths=(7, 5), activation="relu")
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        loss = "cross_entropy"
    elif name == "mlp-tanh":
        model = build_model("mlp", (1, 3, 3), 4, widths=(6,), activation="tanh")
        x, y = torch.randn(9, 1, 3, 3, generator=g), torch.randint(0, 4, (9,), generator=g)
        loss = "cross_entropy"
    elif name == "small-cnn":
        model = build_model("small-cnn", (2, 6, 6), 3, channels=3)
        model.conv2.bias = None
        x, y = torch.randn(7, 2, 6, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
        loss = "cross_entropy"
    elif name == "mse-regression":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        x = torch.randn(10, 4, generator=g)
        y = torch.randn(10, 2, generator=g)
        loss = "mse"
    elif name == "sequence":
        model = SequenceNet()
        x, y = torch.randn(8, 5, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = "cross_entropy"
    elif name == "layernorm":
        model = NormNet()
        x, y = torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g)
        loss = "cross_entropy"
    else:
        raise KeyError(name)
    return Case(name, model.double(), loss, x.double(), y.double() if loss == "mse" else y)


CASE_NAMES = ["mlp-relu", "mlp-tanh", "small-cnn", "mse-regression", "sequence", "layernorm"]


def make_case(name: str, seed: int = 0) -> Case:
    return _case(name, seed)
