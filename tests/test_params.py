"""ParamSpace: flat vectors and dicts, layers, weights and biases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgdgeom.params import ParamSpace


def test_round_trip_and_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    space = ParamSpace(model)
    assert space.dim == 3 * 4 + 4 + 4 * 2
    assert space.layers == ["0", "2"]
    vector = space.vector(model)
    parts = space.unflatten(vector)
    for name, p in model.named_parameters():
        assert torch.equal(parts[name], p.detach())
    assert torch.equal(space.flatten(parts), vector)
    assert torch.equal(space.flatten(list(parts.values())), vector)
    batched = space.flatten({n: torch.stack([t, 2 * t], -1) for n, t in parts.items()})
    assert torch.equal(batched, torch.stack([vector, 2 * vector], 1))
    assert space.layer_numel("0") == 16 and space.layer_numel("0", weights_only=True) == 12
    mask = space.layer_mask("0", weights_only=True)
    assert mask.sum() == 12 and mask[:12].all() and not mask[12:].any()


def test_frozen_parameters_are_outside_the_space_and_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    space = ParamSpace(model)
    assert space.names == ["0.bias", "1.weight", "1.bias"]
    with pytest.raises(KeyError, match="unknown layer 'fc9'"):
        space.layer_params("fc9")
    with pytest.raises(ValueError, match="flat vector"):
        space.unflatten(torch.zeros(3))
    with pytest.raises(KeyError, match="missing"):
        space.flatten({"0.bias": torch.zeros(2)})
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ParamSpace(model)
