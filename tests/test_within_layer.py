"""Musso's footnote 7, ``within_layer_temperatures``: against explicit per-sample gradients,
and the property it measures (a layer whose weights share a temperature by construction
gives a split-half correlation near 0; one whose inputs differ in scale, near 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sgdgeom.errors import InputError
from sgdgeom.monitors.temperature import within_layer_temperatures


def _variances(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """The variance over the samples of each entry of ``name``'s per-sample gradient."""
    rows = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(dict(model.named_parameters())[name].grad.reshape(-1).clone())
    G = torch.stack(rows)
    return G.var(0, unbiased=False)


@pytest.mark.parametrize("n", [6, 7])  # 6: B = in = out; 7: halves of unequal size
def test_equals_explicit_per_sample_gradients(n: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model = model.double()
    x, y = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    got = within_layer_temperatures(model, "cross_entropy", (x, y))
    assert set(got) == {"0", "2", "4"}
    for layer in got:
        whole = _variances(model, x, y, f"{layer}.weight")
        even = _variances(model, x[0::2], y[0::2], f"{layer}.weight")
        odd = _variances(model, x[1::2], y[1::2], f"{layer}.weight")
        q = torch.quantile(whole, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        row = got[layer]
        assert [row["q10"], row["q50"], row["q90"]] == pytest.approx(q.tolist(), rel=1e-10)
        assert row["zero_fraction"] == pytest.approx(float((whole == 0).double().mean()))
        live = (even > 0) & (odd > 0)
        expected = torch.corrcoef(torch.stack([even[live].log(), odd[live].log()]))[0, 1]
        assert row["split_half_correlation"] == pytest.approx(float(expected), rel=1e-9)
        assert row["numel"] == whole.numel()


def _regression_layer(scales: torch.Tensor) -> dict[str, float]:
    """One Linear(256 -> 2) on 2,000 samples whose input column j is ``scales[j]`` times a
    standard normal: weight (k, j)'s gradient variance is proportional to ``scales[j]²``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 256, generator=g, dtype=torch.float64) * scales
    y = torch.randint(0, 2, (2000,), generator=g)
    model = nn.Linear(256, 2).double()
    nn.init.zeros_(model.weight)
    return within_layer_temperatures(model, "cross_entropy", (x, y))[""]


def test_a_common_temperature_gives_no_split_half_correlation():
    """Equal input scales: every weight has the same temperature in expectation, so the
    halves' deviations are independent noise: |r| within about 3/sqrt(512)."""
    row = _regression_layer(torch.ones(256, dtype=torch.float64))
    assert abs(row["split_half_correlation"]) < 3 / 512**0.5
    assert row["ratio_90_10"] < 1.3


def test_unequal_temperatures_give_a_split_half_correlation_near_one():
    scales = torch.logspace(-1, 1, 256, dtype=torch.float64)
    row = _regression_layer(scales)
    assert row["split_half_correlation"] > 0.95 and row["ratio_90_10"] > 10


def test_bad_input():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(InputError, match="no layer with weights named"):
        within_layer_temperatures(model, "cross_entropy", (x, y), layers=["fc9"])
    with pytest.raises(InputError, match="at least 4 samples"):
        within_layer_temperatures(model, "cross_entropy", (x[:3], y[:3]))


def test_a_layer_of_more_than_2_to_the_24_weights():
    """torch.quantile refuses more than 2²⁴ entries; a 4,100 x 4,100 layer is measured."""
    torch.manual_seed(0)
    model = nn.Linear(4100, 4100, bias=False).double()
    x, y = torch.randn(4, 4100, dtype=torch.float64), torch.randint(0, 4100, (4,))
    row = within_layer_temperatures(model, "cross_entropy", (x, y))[""]
    whole = _variances(model, x, y, "weight")
    assert row["numel"] == 4100 * 4100 > 2**24
    q = whole.numpy()
    assert [row["q10"], row["q50"], row["q90"]] == pytest.approx(
        np.quantile(q, [0.1, 0.5, 0.9]).tolist(), rel=1e-10
    )
