"""The operator base (sgdgeom.linalg.Operator) on an explicit matrix, and what the diffusion
matrix exposes besides its products (per-sample gradients and their squared norms, diag(D),
the uncentred second moment, layer blocks), each against the dense reference on the zoo."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.linalg import Operator
from sgdgeom.params import ParamSpace
from sgdgeom.persample import per_sample_loss
from tests.cases import CASE_NAMES, make_case, routes_for
from tests.reference import assert_close, dense_diffusion, per_sample_gradients


class Explicit(Operator):
    """An operator that is an explicit symmetric matrix: the base's reference."""

    def __init__(self, space: ParamSpace, matrix: torch.Tensor) -> None:
        self.space, self.matrix = space, matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


def explicit(seed: int = 0) -> tuple[Explicit, torch.Tensor]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    space = ParamSpace(model)
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(space.dim, space.dim, generator=g, dtype=torch.float64)
    matrix = root @ root.T / space.dim
    return Explicit(space, matrix), matrix


def test_the_base_gives_everything_from_products_alone():
    A, M = explicit()
    d = M.shape[0]
    v = torch.randn(d, dtype=torch.float64)
    assert A.shape == (d, d)
    assert_close(A @ v, M @ v, what="A @ v")
    assert_close(A.matvec(v), M @ v, what="matvec (one column of matmat)")
    V = torch.randn(d, 3, dtype=torch.float64)
    assert_close(A @ V, M @ V, what="A @ V")
    by_name = A @ A.space.unflatten(v)
    assert_close(A.space.flatten(by_name), M @ v, what="A @ dict")
    assert_close(A.dense(), M, what="dense")
    values, vectors = A.eigsh(3)
    expected = torch.linalg.eigvalsh(M).flip(0)[:3]
    assert_close(values, expected, atol=1e-9, what="eigsh values")
    residuals = (M @ vectors - vectors * values).norm(dim=0)
    assert float(residuals.max()) < 1e-6 * float(values[0])


def test_hutchinson_trace_is_unbiased_and_converges():
    A, M = explicit(1)
    exact = float(M.trace())
    estimates = np.array([A.trace(probes=8, seed=s) for s in range(200)])
    stderr = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 4 * stderr
    assert abs(A.trace(probes=4000) - exact) < 0.05 * exact
    with pytest.raises(InputError, match="probes must be >= 1"):
        A.trace(probes=0)


def test_scipy_linear_operator_solves_and_decomposes():
    A, M = explicit(2)
    op = A.to_scipy()
    assert op.shape == M.shape
    b = np.arange(M.shape[0], dtype=np.float64)
    shifted = scipy.sparse.linalg.LinearOperator(
        op.shape, matvec=lambda v: op @ v + v, dtype=np.float64
    )
    x, info = scipy.sparse.linalg.cg(shifted, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose((M.numpy() + np.eye(len(b))) @ x, b, atol=1e-9)
    top = scipy.sparse.linalg.eigsh(op, k=2, which="LA")[0]
    np.testing.assert_allclose(np.sort(top), torch.linalg.eigvalsh(M)[-2:].numpy(), rtol=1e-9)


def test_dense_and_products_check_their_input():
    A, _ = explicit()
    with pytest.raises(InputError, match=r"use A @ v, eigsh\(k\)"):
        A.dense(limit=5)
    with pytest.raises(InputError, match="must be a"):
        A @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(InputError, match="V must be a"):
        A.matmat(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="is float32"):
        A @ torch.ones(A.shape[0])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_per_sample_quantities_equal_the_explicit_gradients(name):
    case = make_case(name)
    loss = per_sample_loss(case.loss)
    G = per_sample_gradients(case.model, loss, case.x, case.y)
    for route in routes_for(name):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route, chunk_size=4)
        assert_close(D.per_sample_gradients(), G, what=f"{name} {route}: G")
        norms = D.sq_norms()
        for name_p, sl in zip(D.space.names, D.space.offsets[:-1], strict=True):
            width = D.space.numels[D.space.names.index(name_p)]
            expected = G[:, sl : sl + width].square().sum(1)
            assert_close(norms[name_p], expected, what=f"{name} {route}: ‖g_i,{name_p}‖²")
        assert_close(D.diagonal(), dense_diffusion(G).diagonal(), what=f"{name} {route}: diag D")


@pytest.mark.parametrize("name", ["mlp-relu", "sequence", "small-cnn", "reused-linear"])
def test_the_uncentred_second_moment_is_the_empirical_fisher(name):
    case = make_case(name)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    fisher = G.T @ G / len(G)
    M = DiffusionMatrix(case.model, case.loss, (case.x, case.y), centered=False)
    assert_close(M.dense(), fisher, what="dense")
    assert_close(M.diagonal(), fisher.diagonal(), what="diag")
    assert M.trace() == pytest.approx(float(fisher.trace()), rel=1e-12)
    top = torch.linalg.eigvalsh(fisher)[-1]
    assert M.lambda_max() == pytest.approx(float(top), rel=1e-10)
    assert_close(M.gram(), G @ G.T / len(G), what="uncentred Gram")
    values, vectors = M.eigh(2)
    assert_close(fisher @ vectors, vectors * values, atol=1e-10, what="eigh of M")
    assert M.rank() <= len(G) and "centered=False" in repr(M)
    with pytest.raises(InputError, match="centered=True"):
        from sgdgeom.metric import DiffusionMetric

        DiffusionMetric(M)


@pytest.mark.parametrize("name", ["mlp-tanh", "layernorm", "partly-frozen", "conv1d"])
def test_layer_blocks_are_the_dense_diagonal_blocks(name):
    case = make_case(name)
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    dense = dense_diffusion(G)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    for layer in D.space.layers:
        block = D.block(layer)
        mask = D.space.layer_mask(layer)
        expected = dense[mask][:, mask]
        assert block.shape == expected.shape
        assert block.space.names == D.space.layer_params(layer)
        assert_close(block.dense(), expected, what=f"{name}: D_{layer}")
        v = torch.randn(block.dim, dtype=torch.float64)
        assert_close(block @ v, expected @ v, what=f"{name}: D_{layer} v")
        assert block.trace() == pytest.approx(float(expected.trace()), rel=1e-10, abs=1e-15)
        traces = block.param_traces()
        for param in block.space.names:
            sl = D.space.slice(param)
            assert traces[param] == pytest.approx(float(dense[sl, sl].trace()), abs=1e-13)


def test_per_sample_gradients_refuse_what_would_not_fit(monkeypatch):
    import sgdgeom.diffusion as diffusion

    case = make_case("mlp-relu")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    monkeypatch.setattr(diffusion, "ROWS_LIMIT", 100)
    with pytest.raises(InputError, match="stream them"):
        D.per_sample_gradients()


def test_subspaces_keep_the_order_and_refuse_unknown_names():
    space = ParamSpace(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    sub = space.subspace(["1.bias", "0.weight"])
    assert sub.names == ["0.weight", "1.bias"] and sub.dim == 7
    with pytest.raises(InputError, match="no parameters"):
        space.subspace(["2.weight"])
