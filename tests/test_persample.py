"""Per-sample products on every zoo model and route, against explicit per-sample gradients."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sgdgeom import DiffusionMatrix
from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import (
    CaptureProducts,
    CoverageError,
    DataSource,
    FuncProducts,
    LayerRule,
    capture,
    capture_chunk,
    make_products,
    per_sample_loss,
    plan_layers,
    register_rule,
    rule_for,
)
from sgdgeom.persample.layers.linear import LinearCall
from tests.cases import CASE_NAMES, make_case, routes_for
from tests.reference import (
    assert_close,
    dense_diffusion,
    per_sample_gradients,
    per_sample_hessians,
)


def _products(case, route, chunk=4):
    return make_products(case.model, case.loss, DataSource((case.x, case.y), chunk), route=route)


@pytest.mark.parametrize("rows_limit", ["default", 0])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_jvp_vjp_grads_gram_norms_against_explicit_gradients(name, rows_limit, monkeypatch):
    """With the default limit, small layers keep per-sample rows; with 0, none does."""
    if rows_limit == 0:
        monkeypatch.setattr(capture, "ROWS_LIMIT", 0)
    case = make_case(name)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(G.shape[1], dtype=torch.float64, generator=g)
    w = torch.randn(G.shape[0], dtype=torch.float64, generator=g)
    V = torch.randn(G.shape[1], 3, dtype=torch.float64, generator=g)
    W = torch.randn(G.shape[0], 3, dtype=torch.float64, generator=g)
    for route in routes_for(name):
        products = _products(case, route)
        what = f"{name} {type(products).__name__}"
        assert_close(products.jvp(v), G @ v, what=f"{what} jvp")
        assert_close(products.vjp(w), G.T @ w, what=f"{what} vjp")
        assert_close(products.jvp_batch(V), G @ V, what=f"{what} batched jvp")
        assert_close(products.vjp_batch(W), G.T @ W, what=f"{what} batched vjp")
        buffer = torch.full((G.shape[1],), float("nan"), dtype=torch.float64)  # stale content
        assert products.vjp(w, out=buffer) is buffer
        assert_close(buffer, G.T @ w, what=f"{what} vjp into a buffer, chunk by chunk")
        assert_close(
            torch.cat([r for _, r in products.per_sample_grads()]),
            G,
            what=f"{what} per-sample grads",
        )
        assert_close(products.gram(), G @ G.T, what=f"{what} gram")
        norms = products.sq_norms()
        expected = torch.stack(
            [G[:, products.space.slice(n)].square().sum(1) for n in products.space.names], 1
        )
        assert_close(norms, expected, what=f"{what} squared norms per parameter")
        assert_close(products.square_sum(), G.square().sum(0), what=f"{what} Σ g_i ⊙ g_i")
        losses = per_sample_loss(case.loss)(case.model(case.x), case.y).detach()
        assert_close(products.losses(), losses, what=f"{what} losses")


@pytest.mark.parametrize("name", ["mlp-tanh", "small-cnn", "mse-regression", "layernorm"])
def test_second_order_products_against_explicit_hessians(name):
    case = make_case(name)
    loss = per_sample_loss(case.loss)
    H = per_sample_hessians(case.model, loss, case.x, case.y)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(H.shape[1], dtype=torch.float64, generator=g)
    w = torch.randn(H.shape[0], dtype=torch.float64, generator=g)
    products = FuncProducts(case.model, case.loss, DataSource((case.x, case.y), 3))
    assert_close(
        products.second_directional(v), torch.einsum("i,nij,j->n", v, H, v), what="vᵀ H_i v"
    )
    assert_close(products.hessian_vector(v, w), torch.einsum("n,nij,j->i", w, H, v), what="Σ w H v")
    if name == "layernorm":  # PyTorch's third derivatives of layer_norm are wrong: refused
        with pytest.raises(UnsupportedModelError, match="layer_norm"):
            products.third_directional(v, w)
        return

    def weighted_second(flat):  # Σ_i w_i vᵀ H_i(x) v through explicit Hessians at x
        space = products.space
        params = dict(zip(space.names, space.unflatten(flat).values(), strict=True))
        total = 0.0
        for i in range(len(case.x)):

            def sample(p, i=i):
                named = dict(zip(space.names, space.unflatten(p).values(), strict=True))
                out = torch.func.functional_call(case.model, named, (case.x[i : i + 1],))
                return loss(out, case.y[i : i + 1]).sum()

            hess = torch.func.hessian(sample)(flat)
            total = total + w[i] * (v @ hess @ v)
        del params
        return total

    flat0 = products.space.vector(case.model)
    expected = torch.func.grad(weighted_second)(flat0)
    assert_close(products.third_directional(v, w), expected, what="Σ w ∇(vᵀ H v)")


def test_capture_route_has_no_second_derivatives():
    case = make_case("mlp-relu")
    products = _products(case, "capture")
    with pytest.raises(UnsupportedModelError, match="route='generic'"):
        products.second_directional(torch.zeros(products.space.dim, dtype=torch.float64))


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if "capture" in routes_for(n)])
def test_memory_mapped_captures_give_the_explicit_products(name, tmp_path):
    """Captures written to raw .npy files and read back through memmap, chunk by chunk."""
    case = make_case(name)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    source = DataSource((case.x, case.y), 3)
    products = CaptureProducts.from_model(
        case.model, case.loss, source, cache="disk", cache_dir=tmp_path
    )
    assert products.storage == "disk" and products.disk.bytes_on_disk() > 0
    assert all(p.suffix == ".npy" or p.name == "owner" for p in products.disk.folder.iterdir())
    V = torch.randn(G.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(products.jvp_batch(V), G @ V, what=f"{name} memmapped jvp")
    assert_close(products.vjp(V[: len(G), 0].contiguous()), G.T @ V[: len(G), 0], what="vjp")
    assert_close(products.gram(), G @ G.T, what=f"{name} memmapped gram")
    folder = products.disk.folder
    del products
    import gc

    gc.collect()
    assert not folder.exists() and tmp_path.exists()  # only its own folder is removed


def test_memory_mapped_captures_of_the_torch_func_fallback(tmp_path):
    """The fallback's calls hold parameters, pytree specs and leaves: all survive the disk."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    products = CaptureProducts.from_model(
        model, "cross_entropy", DataSource((x, y), 4), cache="disk", cache_dir=tmp_path / "new"
    )
    assert type(products.layers[1].rule).__name__ == "FallbackRule"
    assert_close(products.gram(), G @ G.T, what="fallback gram from memmapped captures")
    W = torch.randn(10, 2, dtype=torch.float64)
    assert_close(products.vjp_batch(W), G.T @ W, what="fallback batched vjp")


def test_captures_choose_memory_disk_or_recompute_and_say_so(tmp_path, monkeypatch):
    from sgdgeom.persample import storage

    case = make_case("mlp-relu")
    source = DataSource((case.x, case.y), 4)
    build = functools.partial(CaptureProducts.from_model, case.model, case.loss, source)
    assert build().storage == "memory"
    assert build(cache=False).storage == "stream"
    assert build(cache_limit=1, cache_dir=tmp_path).storage == "disk"
    with pytest.warns(UserWarning, match=r"captures of 12 samples would take .* cache_dir"):
        assert build(cache_limit=1).storage == "stream"
    with pytest.raises(InputError, match="needs a cache_dir"):
        build(cache="disk")
    with pytest.raises(InputError, match="cache must be"):
        build(cache="sometimes")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: shutil_usage(free=10))
    with pytest.raises(InputError, match=r"GiB and .* has 0.0 GiB free"):
        build(cache="disk", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)


def test_products_are_a_snapshot_of_the_parameters():
    for name in ("mlp-relu", "transformer"):
        case = make_case(name)
        for route in ("capture", "generic"):
            products = _products(case, route)
            v = torch.ones(products.space.dim, dtype=torch.float64)
            before = products.jvp(v)
            with torch.no_grad():
                for p in case.model.parameters():
                    p.add_(1.0)
            assert_close(products.jvp(v), before, what=f"{name} {route} snapshot")


# ----------------------------------------------------------------------------- losses


def test_loss_modules_keep_their_options():
    logits = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1])
    smooth = nn.CrossEntropyLoss(label_smoothing=0.2)
    assert_close(per_sample_loss(smooth)(logits, target).mean(), smooth(logits, target))
    bce = nn.BCEWithLogitsLoss()
    y = torch.rand(4, 3, dtype=torch.float64)
    assert_close(per_sample_loss(bce)(logits, y).mean(), bce(logits, y))
    with pytest.raises(UnsupportedModelError, match="class-weighted"):
        per_sample_loss(nn.CrossEntropyLoss(weight=torch.ones(3)))
    with pytest.raises(UnsupportedModelError, match="unsupported loss module"):
        per_sample_loss(nn.L1Loss())


def test_functional_losses_map_to_their_per_sample_forms():
    logits = torch.randn(5, 3, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1, 0])
    soft = torch.rand(5, 3, dtype=torch.float64)
    for function, y in (
        (F.cross_entropy, target),
        (functools.partial(F.cross_entropy, label_smoothing=0.3), target),
        (F.mse_loss, soft),
        (F.binary_cross_entropy_with_logits, soft),
    ):
        per_sample = per_sample_loss(function)(logits, y)
        assert per_sample.shape == (5,)
        assert_close(per_sample.mean(), function(logits, y), what=f"{function} mean")
    with pytest.raises(UnsupportedModelError, match="class-weighted"):
        per_sample_loss(functools.partial(F.cross_entropy, weight=torch.ones(3)))


def test_functional_cross_entropy_gives_the_right_d():
    """Was off by N² (the function averages over the batch); the generic route crashed."""
    case = make_case("mlp-relu")
    G = per_sample_gradients(case.model, per_sample_loss("cross_entropy"), case.x, case.y)
    for route in ("capture", "generic"):
        D = DiffusionMatrix(case.model, F.cross_entropy, (case.x, case.y), route=route)
        assert D.trace() == pytest.approx(float(dense_diffusion(G).trace()), rel=1e-12)


def test_a_loss_that_averages_is_refused_with_a_message():
    case = make_case("mlp-relu")
    averaged = lambda output, target: F.cross_entropy(output, target)  # noqa: E731
    for route in ("capture", "generic"):
        with pytest.raises(UnsupportedModelError, match=r"per-sample loss .* is needed"):
            D = DiffusionMatrix(case.model, averaged, (case.x, case.y), route=route)
            D @ torch.zeros(D.space.dim, dtype=torch.float64)
    per_sample = lambda output, target: F.cross_entropy(output, target, reduction="none")  # noqa: E731
    D = DiffusionMatrix(case.model, per_sample, (case.x, case.y))
    assert D.route == "capture"


# ----------------------------------------------------------------------------- coverage


def test_tied_weight_refused_by_capture_and_exact_by_auto():
    case = make_case("tied-autoencoder")
    with pytest.raises(CoverageError, match=r"enc\.weight .*outside the forward of the modules"):
        DiffusionMatrix(case.model, case.loss, (case.x, case.y), route="capture")
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    with pytest.warns(UserWarning, match="enc.weight"):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    assert D.route == "generic"
    assert D.trace() == pytest.approx(float(dense_diffusion(G).trace()), rel=1e-12)


@pytest.mark.parametrize("length", [6, 5])
def test_a_sequence_first_layer_is_refused_by_capture_and_exact_by_auto(length):
    case = make_case("sequence-first")
    x = case.x[:, :length]
    with pytest.raises(CoverageError, match=r"fc\.|dim 0"):
        DiffusionMatrix(case.model, case.loss, (x, case.y), route="capture")
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), x, case.y)
    with pytest.warns(UserWarning, match="capture route is not exact"):
        D = DiffusionMatrix(case.model, case.loss, (x, case.y))
    assert_close(D.dense(), dense_diffusion(G), what="sequence-first, generic")


def test_tied_weight_inside_one_modules_forward_stays_on_the_capture_route():
    """The root owns a parameter, so the fallback owns the whole model and is exact."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t()) * self.scale

    torch.manual_seed(0)
    model = Tied().double()
    data = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,)))
    D = DiffusionMatrix(model, "cross_entropy", data, route="capture")
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="root fallback")


def test_a_parameter_shared_between_modules_stays_on_the_capture_route():
    """Its per-sample gradient is the sum of both modules' contributions; the Gram matrix
    and the squared norms take the cross terms between them too."""
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    D = DiffusionMatrix(model, "cross_entropy", data)
    assert D.route == "capture"
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="shared weight, capture")
    centred = G - G.mean(0)
    assert_close(D.gram(), centred @ centred.T / 5, what="shared weight: Gram")
    space = D.space
    norms = torch.stack([G[:, space.slice(n)].square().sum(1) for n in space.names], 1)
    assert_close(D.products.sq_norms(), norms, what="shared weight: squared norms")
    assert_close(D.products.square_sum(), G.square().sum(0), what="shared weight: squares")


def test_module_called_twice_stays_exact_on_the_capture_route():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    D = DiffusionMatrix(model, "cross_entropy", data, route="capture")
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="reused layer")


class Repeated(nn.Module):
    """One Linear(8, 8) applied ``calls`` times along a sequence of ``length``, then pooled."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            x = torch.tanh(self.fc(x))
        return self.out(x.mean(1))


@pytest.mark.parametrize("calls", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 2, 8])
def test_gram_where_batch_features_and_length_coincide(calls, length, monkeypatch):
    """B = in = out = 8 (and T = 8): an index that takes one of these axes for another passes
    every test where they differ. The layer's calls are kept as captures (no rows), so its
    own Gram formula serves where it has one (T·calls ≤ 2 here), the rows elsewhere."""
    monkeypatch.setattr(capture, "ROWS_LIMIT", 0)
    torch.manual_seed(calls * 10 + length)
    model = Repeated(calls).double()
    x = torch.randn(8, length, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    products = make_products(model, "cross_entropy", DataSource((x, y), None), route="capture")
    what = f"{calls} calls, length {length}"
    assert_close(products.gram(), G @ G.T, what=f"{what}: gram")
    expected = torch.stack(
        [G[:, products.space.slice(n)].square().sum(1) for n in products.space.names], 1
    )
    assert_close(products.sq_norms(), expected, what=f"{what}: squared norms")
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    values = torch.linalg.eigvalsh(dense_diffusion(G)).flip(0)[: len(x)]
    assert_close(D.eigvalsh(), values, atol=1e-12, what=f"{what}: spectrum")


def test_frozen_weight_with_trainable_bias_in_every_route():
    case = make_case("partly-frozen")
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert "fc1.weight" not in names and "fc1.bias" in names and "out.bias" not in names
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    for route in ("capture", "generic"):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route)
        assert D.space.names == names
        assert_close(D.dense(), dense_diffusion(G), what=f"{route} partly frozen")
        assert set(D.layer_traces()) == {"fc1", "fc2", "out"}


# ----------------------------------------------------------------------------- registry


def test_registry_serves_every_rule_and_falls_back():
    assert type(rule_for(nn.Linear(2, 2))).__name__ == "LinearRule"
    assert type(rule_for(nn.Conv1d(2, 2, 3))).__name__ == "ConvRule"
    assert type(rule_for(nn.Conv2d(2, 2, 3))).__name__ == "ConvRule"
    assert type(rule_for(nn.Conv2d(2, 4, 3, groups=2))).__name__ == "ConvRule"  # grouped
    assert type(rule_for(nn.Embedding(4, 2))).__name__ == "EmbeddingRule"
    assert type(rule_for(nn.LayerNorm(3))).__name__ == "LayerNormRule"
    assert type(rule_for(nn.GroupNorm(1, 2))).__name__ == "GroupNormRule"
    assert type(rule_for(nn.BatchNorm2d(2).eval())).__name__ == "BatchNormRule"
    assert type(rule_for(nn.MultiheadAttention(4, 2))).__name__ == "MultiheadAttentionRule"
    for declined in (
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Embedding(4, 2, max_norm=1.0),
        nn.MultiheadAttention(4, 2, kdim=3, vdim=3),
        nn.PReLU(),
    ):
        assert type(rule_for(declined)).__name__ == "FallbackRule"

    class LoRALinear(nn.Linear):  # changes the forward: the Linear rule must not apply
        def forward(self, x):
            return super().forward(x) * 2

    class Subclass(nn.Linear):  # keeps the forward: the Linear rule applies
        pass

    assert type(rule_for(LoRALinear(2, 2))).__name__ == "FallbackRule"
    assert type(rule_for(Subclass(2, 2))).__name__ == "LinearRule"


def test_declined_and_unknown_modules_are_exact_through_the_fallback():
    torch.manual_seed(0)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grouped = nn.Conv2d(2, 4, 3, groups=2, padding="same", padding_mode="reflect")
            self.act = nn.PReLU(4)
            self.attn = nn.MultiheadAttention(4, 2)  # batch_first=False: batch is dim 1
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            h = self.act(self.grouped(x)).flatten(2).permute(2, 0, 1)  # (T, B, E)
            h, _ = self.attn(h, h, h)
            return self.out(h.mean(0))

    model = Odd().double().eval()
    data = (torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    D = DiffusionMatrix(model, "cross_entropy", data, route="capture", chunk_size=2)
    rules = {layer.name: type(layer.rule).__name__ for layer in D.products.layers}
    assert rules == {
        "grouped": "FallbackRule",
        "act": "FallbackRule",
        "attn": "MultiheadAttentionRule",
        "out": "LinearRule",
    }
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="fallback modules")
    centred = G - G.mean(0)
    assert_close(D.gram(), centred @ centred.T / len(G), what="fallback Gram matrix")


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_rule_and_its_masked_calls_are_exact(batch_first):
    """Unmasked calls take the attention rule; masked ones (attn_mask, key padding,
    is_causal) its fallback; a module the rule declines (kdim) the fallback too."""

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.MultiheadAttention(6, 2, batch_first=batch_first)
            self.masked = nn.MultiheadAttention(6, 3, batch_first=batch_first, bias=False)
            self.cross = nn.MultiheadAttention(6, 2, kdim=4, vdim=4, batch_first=True)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            h = x if batch_first else x.transpose(0, 1)
            h = self.plain(h, h, h)[0]
            causal = torch.triu(torch.full((5, 5), float("-inf"), dtype=x.dtype), 1)
            h = self.masked(h, h, h, attn_mask=causal, need_weights=False)[0]
            h = h if batch_first else h.transpose(0, 1)
            h = self.cross(h, x[..., :4], x[..., :4], need_weights=False)[0]
            return self.out(h.mean(1))

    torch.manual_seed(0)
    model = Attend().double().eval()
    data = (torch.randn(6, 5, 6, dtype=torch.float64), torch.randint(0, 3, (6,)))
    D = DiffusionMatrix(model, "cross_entropy", data, route="capture", chunk_size=4)
    rules = {layer.name: type(layer.rule).__name__ for layer in D.products.layers}
    assert rules["plain"] == rules["masked"] == "MultiheadAttentionRule"
    assert rules["cross"] == "FallbackRule"
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="attention")
    for limit in (0, capture.ROWS_LIMIT):  # the rule's own products, and its rows
        capture.ROWS_LIMIT, saved = limit, capture.ROWS_LIMIT
        try:
            products = make_products(model, "cross_entropy", DataSource(data, 4))
            v = torch.randn(products.space.dim, dtype=torch.float64)
            assert_close(products.jvp(v), G @ v, what=f"attention jvp, rows limit {limit}")
            assert_close(products.vjp(G @ v), G.T @ (G @ v), what="attention vjp")
        finally:
            capture.ROWS_LIMIT = saved


def test_a_user_rule_is_used_for_its_module():
    class Scale(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.weight

    calls = []

    @register_rule(Scale)
    class ScaleRule(LayerRule):
        def call(self, module, saved, grads):
            calls.append(1)
            return LinearCall(saved[:, None], grads[0][:, None])

        def jvp(self, module, call, v):
            return (call.grads[:, 0] * call.inputs[:, 0] * v["weight"]).sum(1)

        def vjp(self, module, call, w, out, accumulate):
            value = torch.einsum("b,bp,bp->p", w, call.grads[:, 0], call.inputs[:, 0])
            out["weight"].add_(value) if accumulate else out["weight"].copy_(value)

        def per_sample(self, module, call, names):
            return {"weight": call.grads[:, 0] * call.inputs[:, 0]}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Scale(4)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,)))
    D = DiffusionMatrix(model, "cross_entropy", data, route="capture")
    assert calls and isinstance(D.products.layers[1].rule, ScaleRule)
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    assert_close(D.dense(), dense_diffusion(G), what="user rule")


def test_capture_gives_per_sample_output_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    loss = per_sample_loss("cross_entropy")
    calls, losses, _ = capture_chunk(model, plan_layers(model), loss, x, y)
    assert_close(calls[0][0].inputs[:, 0], x)
    # δ_i = softmax(z_i) − onehot(y_i) for cross-entropy, for each sample separately
    expected = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 2)
    assert_close(calls[0][0].grads[:, 0], expected.detach())
    assert_close(losses, loss(model(x), y).detach())


def test_a_layer_never_called_has_zero_gradients():
    torch.manual_seed(0)

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Skips().double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    products = CaptureProducts.from_model(model, "cross_entropy", DataSource(data))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    w = torch.randn(5, dtype=torch.float64)
    buffer = torch.full((products.space.dim,), float("nan"), dtype=torch.float64)
    assert_close(products.vjp(w, out=buffer), G.T @ w, what="unused layer")


def test_data_source_validation():
    with pytest.raises(ValueError, match="same number"):
        DataSource((torch.zeros(3, 2), torch.zeros(2)))
    with pytest.raises(TypeError, match="batch"):
        DataSource(5)
    with pytest.raises(ValueError, match="chunk_size"):
        DataSource((torch.zeros(3, 2), torch.zeros(3)), chunk_size=0)
    assert [len(x) for _, x, _ in DataSource((torch.zeros(7, 2), torch.zeros(7)), 3)] == [3, 3, 1]


def test_the_coverage_check_runs_once_per_model_loss_and_input_shape(monkeypatch):
    seen = []
    original = capture.check_coverage

    def counting(*args):
        seen.append(1)
        return original(*args)

    monkeypatch.setattr(capture, "check_coverage", counting)
    case = make_case("mlp-relu")
    for _ in range(2):
        DiffusionMatrix(case.model, case.loss, (case.x, case.y), route="capture")
    assert len(seen) == 1
    DiffusionMatrix(case.model, "mse", (case.x, torch.randn(len(case.x), 3).double()))
    assert len(seen) == 2  # another loss: checked again


def test_readme_any_model_examples_run():
    """The guide's transformer examples (D on any model, the optimizer), as written."""
    guide = Path(__file__).parents[1] / "docs/guide"
    pages = "".join((guide / page).read_text() for page in ("diffusion.md", "metric.md"))
    blocks = [b.split("```")[0] for b in pages.split("```python\n")[1:]]
    examples = [b for b in blocks if 'build_model("transformer"' in b]
    assert len(examples) == 2
    for block in examples:
        exec(compile(block, "README.md", "exec"), {})


def test_attention_rule_checks_its_output_once_per_mode_and_catches_a_change():
    """The recomputed output is checked on the first call in eval and in train mode only;
    dropout switched on after the plan (train mode) fails that check, never a number."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attend().double().eval()
    opt = DiffusionMetricSGD(model, lr=0.1)
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    rule = next(layer.rule for layer in opt._capture.recorder.layers if layer.name == "attn")
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert rule._checked[model.attn] == {False}
    model.train()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        opt.step()


def test_coverage_tolerance_follows_the_precision_of_the_products(monkeypatch):
    """float32 on CUDA may run on TF32 tensor cores (cuDNN convolutions by default): the
    check then allows sqrt(2^-10), else sqrt(eps) of the dtype (a conv net on an H100
    failed the check with relative errors of 9e-4 before)."""
    from sgdgeom.persample.capture import coverage_tolerance

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert coverage_tolerance(torch.float32, cuda) == pytest.approx(2**-5)
    assert coverage_tolerance(torch.float32, cpu) == torch.finfo(torch.float32).eps ** 0.5
    assert coverage_tolerance(torch.float64, cuda) == torch.finfo(torch.float64).eps ** 0.5
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert coverage_tolerance(torch.float32, cuda) == torch.finfo(torch.float32).eps ** 0.5
