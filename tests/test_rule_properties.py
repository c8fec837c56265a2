"""Every layer rule against its own per-sample rows, and every route against brute force,
on the zoo and on shapes where dimensions coincide.

A rule's cheap formulas (``gram``, ``sq_norms``, ``square_sum``, ``jvp``/``vjp`` and their
batched forms) must equal what its own materialised rows (``per_sample``) give; the rows
themselves, and every route's products and spectrum, must equal explicit per-sample
gradients. The shapes where the batch, the features, the channels and the sequence length
are all equal (a layer called 1, 2 and 3 times, sequences of length 1, 2 and long) are
where an index that takes one axis for another passes every other test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import (
    CoverageError,
    DataSource,
    capture_chunk,
    make_products,
    per_sample_loss,
    plan_layers,
)
from tests.cases import CAPTURE_REFUSED, CASE_NAMES, make_case
from tests.reference import assert_close, dense_diffusion, per_sample_gradients

N = 8  # batch = features = channels = sequence length in the coinciding shapes: with in = out
# = 8 the Linear's ghost Gram formula serves sequences of length 2 (T² (in + out) ≤ in out)


class Repeated(nn.Module):
    """One module called ``calls`` times on ``(N, T, N)`` inputs, then a head."""

    def __init__(self, layer: nn.Module, calls: int, pool: bool = True) -> None:
        super().__init__()
        self.layer, self.calls, self.pool = layer, calls, pool
        self.out = nn.Linear(N, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            x = torch.tanh(self.layer(x))
        return self.out(x.mean(1) if self.pool else x)


class RepeatedConv(nn.Module):
    """A Conv1d with in = out channels = length = batch, called ``calls`` times (grouped
    into ``groups``: N is depthwise)."""

    def __init__(self, calls: int, groups: int = 1) -> None:
        super().__init__()
        self.conv, self.calls = nn.Conv1d(N, N, 3, padding=1, groups=groups), calls
        self.out = nn.Linear(N * N, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            x = torch.tanh(self.conv(x))
        return self.out(x.flatten(1))


class Tokens(nn.Module):
    """An embedding of N tokens into N features, sequences of N tokens, batch N."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(N, N)
        self.out = nn.Linear(N, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)).mean(1))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(N, 2, batch_first=True)
        self.out = nn.Linear(N, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x)
        return self.out(h.mean(1))


def _coinciding(name: str):
    """``(model, x)``: the shape cases, float64, batch N."""
    g = torch.Generator().manual_seed(7)
    kind, _, rest = name.partition("-")
    if kind == "linear":  # linear-{calls}x-T{length}
        calls, length = (
            int(part[:-1] if part.endswith("x") else part[1:]) for part in rest.split("-")
        )
        return Repeated(nn.Linear(N, N), calls), torch.randn(N, length, N, generator=g)
    if kind == "flat":  # a 2-D Linear called twice, batch = in = out (the reported bug)
        return Repeated(nn.Linear(N, N), 2, pool=False), torch.randn(N, N, generator=g)
    if kind == "conv":  # conv-{calls}x, or conv-{calls}x-g{groups}
        calls, _, groups = rest.partition("-g")
        model = RepeatedConv(int(calls[:-1]), int(groups or 1))
        return model, torch.randn(N, N, N, generator=g)
    if kind == "grouped2d":  # a grouped Conv2d, 2 groups of 2 channels, 3 x 3 images
        model = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
        )
        return model, torch.randn(N, 4, 3, 3, generator=g)
    if kind == "deep2d":  # N channels in and out, 3 x 3 images, stride 2: 2 x 2 outputs,
        # few positions against the channels (the ghost norms)
        model = nn.Sequential(
            nn.Conv2d(N, N, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * N, 3)
        )
        return model, torch.randn(N, N, 3, 3, generator=g)
    if kind == "embedding":
        return Tokens(), torch.randint(0, N, (N, N), generator=g)
    if kind == "attention":
        return SelfAttention(), torch.randn(N, N, N, generator=g)
    if kind == "layernorm":
        return Repeated(nn.LayerNorm(N), 2), torch.randn(N, N, N, generator=g)
    raise KeyError(name)


COINCIDING = [
    *(f"linear-{c}x-T{t}" for c in (1, 2, 3) for t in (1, 2, N, 16)),
    "flat-2x",
    "conv-1x",
    "conv-2x",
    "conv-1x-g2",
    f"conv-2x-g{N}",  # depthwise
    "grouped2d",
    "deep2d",
    "embedding",
    "attention",
    "layernorm",
]


def build(name: str):
    """``(model, loss, x, y)`` of a zoo case or a coinciding shape, float64."""
    if name in COINCIDING:
        torch.manual_seed(sum(map(ord, name)))
        model, x = _coinciding(name)
        y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(1))
        return model.double(), "cross_entropy", x if not x.is_floating_point() else x.double(), y
    case = make_case(name)
    return case.model, case.loss, case.x, case.y


RULE_CASES = [n for n in CASE_NAMES if n not in CAPTURE_REFUSED] + COINCIDING


def _rows(layer, calls) -> list[dict[str, torch.Tensor]]:
    """Each call's own per-sample rows ``{name: (b, numel)}``."""
    return [
        {
            n: r.reshape(len(r), -1)
            for n, r in layer.rule.per_sample(layer.module, c, layer.names).items()
        }
        for c in calls
    ]


def _flat(rows: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([rows[n] for n in names], 1)


def test_a_deep_convolution_has_a_norm_formula_and_a_shallow_one_does_not():
    """The property test above checks ``sq_norms`` where a rule has it: make sure the
    convolution's is exercised (2 x 2 outputs of 8 channels) and declined where the rows
    are cheaper (8 positions of a Conv1d)."""
    for name, expected in (("deep2d", True), ("conv-1x", False)):
        model, loss, x, y = build(name)
        layers = plan_layers(model)
        calls, _, _ = capture_chunk(model, layers, per_sample_loss(loss), x, y, compact=False)
        conv = layers[0]
        norms = conv.rule.sq_norms(conv.module, calls[0][0], conv.names)
        assert (norms is not None) is expected, name


@pytest.mark.parametrize("name", RULE_CASES)
def test_every_rule_formula_equals_its_own_rows(name):
    model, loss, x, y = build(name)
    layers = plan_layers(model)
    calls, _, _ = capture_chunk(model, layers, per_sample_loss(loss), x, y, compact=False)
    g = torch.Generator().manual_seed(0)
    for layer, layer_calls in zip(layers, calls, strict=True):
        rule, module, names = layer.rule, layer.module, layer.names
        rows = _rows(layer, layer_calls)
        what = f"{name}: {layer.name or 'model'} ({type(rule).__name__})"
        for c, own in zip(layer_calls, rows, strict=True):
            flat = _flat(own, names)
            b = len(flat)
            V = {n: torch.randn(3, *layer.shapes[n], generator=g, dtype=flat.dtype) for n in names}
            V_flat = torch.cat([V[n].reshape(3, -1) for n in names], 1)
            assert_close(rule.jvp_batch(module, c, V), flat @ V_flat.T, what=f"{what}: jvp_batch")
            assert_close(
                rule.jvp(module, c, {n: v[0] for n, v in V.items()}),
                flat @ V_flat[0],
                what=f"{what}: jvp",
            )
            W = torch.randn(b, 3, generator=g, dtype=flat.dtype)
            got = rule.vjp_batch(module, c, W, names)
            assert_close(
                torch.cat([got[n].reshape(3, -1) for n in names], 1),
                W.T @ flat,
                what=f"{what}: vjp_batch",
            )
            out = {n: torch.empty(layer.shapes[n], dtype=flat.dtype) for n in names}
            rule.vjp(module, c, W[:, 0].contiguous(), out, accumulate=False)
            assert_close(
                torch.cat([out[n].reshape(-1) for n in names]), W[:, 0] @ flat, what=f"{what}: vjp"
            )
            norms = rule.sq_norms(module, c, names)
            if norms is not None:
                for n in names:
                    assert_close(norms[n], own[n].square().sum(1), what=f"{what}: sq_norms {n}")
            squares = rule.square_sum(module, c, names)
            if squares is not None:
                for n in names:
                    assert_close(
                        squares[n].reshape(-1),
                        own[n].square().sum(0),
                        what=f"{what}: square_sum {n}",
                    )
        # the Gram matrix between every pair of calls (a layer called several times whose
        # rule keeps its calls apart), summed, against the rows summed over the calls
        pairs = [[rule.gram(module, ci, cj, names) for cj in layer_calls] for ci in layer_calls]
        if layer_calls and all(p is not None for row in pairs for p in row):
            summed = sum(_flat(r, names) for r in rows)
            assert_close(
                sum(p for row in pairs for p in row), summed @ summed.T, what=f"{what}: gram"
            )


@pytest.mark.parametrize("name", COINCIDING)
@pytest.mark.parametrize("route", ["capture", "generic"])
def test_every_route_equals_brute_force_where_dimensions_coincide(name, route, monkeypatch):
    """Products of both routes, with the layers' calls kept and with their rows formed,
    and D's spectrum, against explicit per-sample gradients."""
    model, loss, x, y = build(name)
    G = per_sample_gradients(model, per_sample_loss(loss), x, y)
    for rows_limit in [0, 2**28] if route == "capture" else [None]:
        if rows_limit is not None:
            monkeypatch.setattr("sgdgeom.persample.capture.ROWS_LIMIT", rows_limit)
        products = make_products(model, loss, DataSource((x, y), None), route=route)
        what = f"{name}, {route}, rows limit {rows_limit}"
        space = products.space
        assert_close(products.gram(), G @ G.T, what=f"{what}: gram")
        expected = torch.stack([G[:, space.slice(n)].square().sum(1) for n in space.names], 1)
        assert_close(products.sq_norms(), expected, what=f"{what}: sq_norms")
        V = torch.randn(
            space.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        assert_close(products.jvp_batch(V), G @ V, what=f"{what}: jvp_batch")
        W = torch.randn(len(x), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert_close(products.vjp_batch(W), G.T @ W, what=f"{what}: vjp_batch")
    D = DiffusionMatrix(model, loss, (x, y), route=route)
    values = torch.linalg.eigvalsh(dense_diffusion(G)).flip(0)[: len(x)]
    assert_close(D.eigvalsh(), values, atol=1e-12, what=f"{name}, {route}: spectrum")


@pytest.mark.parametrize("name", ["flat-2x", "linear-2x-T8", "linear-3x-T1"])
@pytest.mark.parametrize("inverse", ["weak", "exact"])
def test_metric_step_on_a_layer_called_several_times_equals_the_dense_update(name, inverse):
    model, loss, x, y = build(name)
    G = per_sample_gradients(copy.deepcopy(model), per_sample_loss(loss), x, y)
    D, g_bar = dense_diffusion(G), G.mean(0)
    eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1])
    eye = torch.eye(len(D), dtype=torch.float64)
    step = (
        torch.linalg.solve(eye + eps * D, g_bar) if inverse == "exact" else g_bar - eps * D @ g_bar
    )
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = DiffusionMetricSGD(model, lr=1.0, inverse=inverse)
    per_sample_loss(loss)(model(x), y).mean().backward()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_close(after, start - step, what=f"{name}: the metric step")


def test_the_first_step_refuses_a_rule_whose_gram_formula_is_wrong(monkeypatch):
    """The bug this file guards against, put back into a rule: the optimizer's first step
    compares the Gram diagonal with the rule's own rows and refuses, naming the layer."""
    from sgdgeom.persample.layers.linear import LinearRule

    def mixed_up(self, module, call_i, call_j, names):  # the sample letter reused
        delta = torch.einsum("ito,jso->itjs", call_i.grads, call_j.grads)
        act = torch.einsum("iti,jsi->itjs", call_i.inputs, call_j.inputs)
        return (delta * act).sum((1, 3)) + call_i.grads.sum(1) @ call_j.grads.sum(1).T

    model, loss, x, y = build("flat-2x")
    monkeypatch.setattr(LinearRule, "gram", mixed_up)
    opt = DiffusionMetricSGD(model, lr=1.0)
    per_sample_loss(loss)(model(x), y).mean().backward()
    with pytest.raises(CoverageError, match="Gram formula of the layer rule of layer"):
        opt.step()
