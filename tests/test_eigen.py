"""Block eigensolvers against full eigendecompositions, in float64."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from sgdgeom import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.hessian import HessianOperator
from sgdgeom.linalg import METHODS, top_eigenpairs


@pytest.fixture(scope="module")
def digits_d():
    """D of a 64-40-40-10 tanh MLP over N = 2,000 samples (digits, plus a noisy copy)."""
    torch.manual_seed(0)
    X, Y = load_digits(return_X_y=True)
    x = torch.tensor(X[:1000] / 16.0)
    x = torch.cat([x, x + 0.05 * torch.randn_like(x)])
    y = torch.tensor(Y[:1000]).repeat(2)
    model = nn.Sequential(
        nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 10)
    ).double()
    return DiffusionMatrix(model, "cross_entropy", (x, y))


@pytest.mark.parametrize("method", METHODS)
def test_top_20_of_d_over_2000_samples_equal_the_full_spectrum(digits_d, method):
    D = digits_d
    assert D.n == 2000
    reference = D.eigvalsh()[:20]
    pairs = D.eigsh(20, method)
    assert pairs.method == method and pairs.converged
    assert float(((pairs.values - reference).abs() / reference).max()) < 1e-8
    # the residuals it reports are the true ones, and below tolerance
    U = pairs.vectors
    true = (D @ U - U * pairs.values).norm(dim=0)
    torch.testing.assert_close(pairs.residuals, true, rtol=1e-6, atol=1e-12 * float(reference[0]))
    assert float(pairs.residuals.max()) <= 1.5e-8 * float(reference[0])
    torch.testing.assert_close(U.T @ U, torch.eye(20, dtype=torch.float64), atol=1e-10, rtol=0)
    values, vectors = pairs  # unpacks like eigsh
    assert values is pairs.values and vectors is pairs.vectors


def test_block_methods_take_fewer_passes_than_single_vector_lanczos(digits_d):
    passes = {m: digits_d.eigsh(20, m).passes for m in METHODS}
    assert passes["block-lanczos"] < passes["randomized"] < passes["lanczos"]


def test_the_default_method_on_the_cpu_is_single_vector_lanczos_on_every_route():
    """On the CPU a pass costs about its products, whether the captures are in memory,
    taken again on every pass (cache="off") or the model runs on every product (generic),
    and for the Hessian: single-vector Lanczos, the fewest products, agreeing with block
    Lanczos (the fewest passes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    operators = {
        "in memory": DiffusionMatrix(model, "cross_entropy", (x, y)),
        "streamed": DiffusionMatrix(model, "cross_entropy", (x, y), cache="off"),
        "generic": DiffusionMatrix(model, "cross_entropy", (x, y), route="generic"),
        "hessian": HessianOperator(model, "cross_entropy", (x, y)),
    }
    for name, operator in operators.items():
        single, block = operator.eigsh(4), operator.eigsh(4, "block-lanczos")
        assert single.method == "lanczos", name
        assert single.products < block.products and block.passes < single.passes, name
        torch.testing.assert_close(single.values, block.values, rtol=1e-8, atol=0)


def test_costs_are_counted():
    A = torch.diag(0.7 ** torch.arange(200, dtype=torch.float64))
    calls = []

    def matmat(V):
        calls.append(V.shape[1])
        return A @ V

    pairs = top_eigenpairs(matmat, 200, 4, torch.float64, method="randomized", oversample=6)
    assert pairs.passes == len(calls) and pairs.products == sum(calls)
    assert set(calls) == {10}  # k + oversample vectors per pass
    torch.testing.assert_close(pairs.values, A.diagonal()[:4], rtol=1e-10, atol=0)


def test_a_low_rank_operator_exhausts_its_range_and_gives_zeros_beyond_it():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(100, 6, dtype=torch.float64, generator=g)
    A = B @ B.T  # rank 6
    exact = torch.linalg.eigvalsh(A).flip(0)[:8]
    for method in ("randomized", "block-lanczos"):
        for oversample in (0, 10):
            pairs = top_eigenpairs(
                lambda V: A @ V, 100, 8, torch.float64, method=method, oversample=oversample
            )
            torch.testing.assert_close(pairs.values, exact, rtol=0, atol=1e-10 * float(exact[0]))
            assert pairs.converged and float(pairs.values[6:].abs().max()) < 1e-9


def test_bad_arguments_and_non_convergence_are_reported():
    A = torch.diag(torch.linspace(1.0, 0.9, 300, dtype=torch.float64))  # no gap
    with pytest.raises(InputError, match="method must be one of"):
        top_eigenpairs(lambda V: A @ V, 300, 3, torch.float64, method="power")
    with pytest.raises(InputError, match="k must be in"):
        top_eigenpairs(lambda V: A @ V, 300, 0, torch.float64)
    with pytest.warns(UserWarning, match="raise max_passes"):
        pairs = top_eigenpairs(lambda V: A @ V, 300, 3, torch.float64, max_passes=2)
    assert not pairs.converged and pairs.passes == 2
