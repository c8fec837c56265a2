"""The papers' architectures: names, shapes and initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgdgeom.errors import ConfigError
from sgdgeom.models import build_model


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_fc_layers_and_width(depth):
    model = build_model("fc", (1, 28, 28), 10, depth=depth, activation="tanh")
    names = linear_names(model)
    assert names == [f"fc{i}" for i in range(1, depth + 1)] + ["out"]
    assert all(getattr(model, n).out_features == 784 for n in names[:-1])
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(model.act_fc1, nn.Tanh)


@pytest.mark.parametrize(
    ("name", "shape", "width"),
    [("cnn-cifar10", (3, 32, 32), 128 * 4 * 4), ("cnn-stl10", (3, 96, 96), 16 * 20 * 20)],
)
def test_musso_cnns(name, shape, width):
    with torch.device("meta"):
        model = build_model(name, shape, 10, init="kaiming")
        out = model(torch.zeros(2, *shape))
    assert out.shape == (2, 10)
    assert linear_names(model) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "out"]
    assert model.fc1.in_features == model.fc1.out_features == model.fc2.out_features == width


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), 10, depth=2, init="kaiming")
    weight = model.fc1.weight
    assert abs(weight.std().item() - (2 / 784) ** 0.5) < 2e-3
    assert torch.count_nonzero(model.fc1.bias) == 0


def test_bad_model_options():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="depth must be"):
        build_model("fc", (1, 8, 8), 10, depth=7)
    with pytest.raises(ConfigError, match="unknown activation"):
        build_model("fc", (1, 8, 8), 10, activation="gelu")
    with pytest.raises(ConfigError, match="bad options"):
        build_model("fc", (1, 8, 8), 10, channels=3)
    with pytest.raises(ConfigError, match="image input"):
        build_model("small-cnn", (40,), 10)
