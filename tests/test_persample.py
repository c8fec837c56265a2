"""Per-sample products: JVP, VJP, second directional derivatives, both routes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.persample import (
    DataSource,
    FuncProducts,
    LayerProducts,
    capture_layers,
    fast_route_layers,
    per_sample_loss,
)
from tests.cases import CASE_NAMES, make_case
from tests.reference import assert_close, per_sample_gradients, per_sample_hessians


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jvp_vjp_grads_gram_norms_against_explicit_gradients(name):
    case = make_case(name)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(G.shape[1], dtype=torch.float64, generator=g)
    w = torch.randn(G.shape[0], dtype=torch.float64, generator=g)
    routes = [FuncProducts(case.model, case.loss, DataSource((case.x, case.y), 4))]
    if name != "layernorm":
        routes.append(
            LayerProducts.from_model(case.model, case.loss, DataSource((case.x, case.y), 4))
        )
    for products in routes:
        what = type(products).__name__
        assert_close(products.jvp(v), G @ v, what=f"{what} jvp")
        assert_close(products.vjp(w), G.T @ w, what=f"{what} vjp")
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
        assert_close(norms.sum(1), G.square().sum(1), what=f"{what} squared norms")
        losses = per_sample_loss(case.loss)(case.model(case.x), case.y).detach()
        assert_close(products.losses(), losses, what=f"{what} losses")


@pytest.mark.parametrize("name", ["mlp-tanh", "small-cnn", "mse-regression"])
def test_second_directional_derivative_against_explicit_hessians(name):
    case = make_case(name)
    H = per_sample_hessians(case.model, per_sample_loss(case.loss), case.x, case.y)
    v = torch.randn(H.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    products = FuncProducts(case.model, case.loss, DataSource((case.x, case.y), 3))
    assert_close(
        products.second_directional(v), torch.einsum("i,nij,j->n", v, H, v), what="vᵀ H_i v"
    )


def test_products_are_a_snapshot_of_the_parameters():
    case = make_case("mlp-relu")
    products = FuncProducts(case.model, case.loss, DataSource((case.x, case.y)))
    v = torch.ones(products.space.dim, dtype=torch.float64)
    before = products.jvp(v)
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(1.0)
    assert_close(products.jvp(v), before, what="snapshot")


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


def test_fast_route_layer_checks():
    assert fast_route_layers(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(1, 1, 3)))
    reason = fast_route_layers(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))
    assert isinstance(reason, str) and "groups" in reason
    reason = fast_route_layers(nn.Sequential(nn.Embedding(3, 2)))
    assert isinstance(reason, str) and "Embedding '0'" in reason


def test_capture_gives_per_sample_output_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    loss = per_sample_loss("cross_entropy")
    captures, losses = capture_layers(model, [("0", model[0])], loss, x, y)
    assert_close(captures[0].inputs[:, 0], x)
    # δ_i = softmax(z_i) − onehot(y_i) for cross-entropy, for each sample separately
    expected = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 2)
    assert_close(captures[0].grads[:, 0], expected.detach())
    assert_close(losses, loss(model(x), y).detach())


def test_data_source_validation():
    with pytest.raises(ValueError, match="same number"):
        DataSource((torch.zeros(3, 2), torch.zeros(2)))
    with pytest.raises(TypeError, match="batch"):
        DataSource(5)
    with pytest.raises(ValueError, match="chunk_size"):
        DataSource((torch.zeros(3, 2), torch.zeros(3)), chunk_size=0)
    assert [len(x) for _, x, _ in DataSource((torch.zeros(7, 2), torch.zeros(7)), 3)] == [3, 3, 1]
