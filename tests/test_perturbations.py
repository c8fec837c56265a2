"""The counter-based uniform source of partial local entropy, and antithetic pairs: the
kernel against the torch reference bit for bit, the statistics of the draws, the pairing,
the closed form on a quadratic loss, and equal draws on 2 gloo ranks."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from sgdgeom.errors import InputError
from sgdgeom.optim import perturbations
from sgdgeom.optim.local_entropy import PartialLocalEntropy
from sgdgeom.optim.perturbations import BITS, draw_key, point_key, uniform_
from tests.distributed import spawn

HALF = 0.37


def _draw(count: int, key: int = 12345, half: float = HALF, **kw) -> torch.Tensor:
    out = torch.empty(1, count, dtype=torch.float64)
    return uniform_(out, [key], half, **kw)[0]


@pytest.fixture(params=[1, 2], ids=["serial-kernel", "parallel-kernel"])
def threads(request):
    """One torch thread (numba's serial kernel) or two (its parallel one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 9), (4, 784)])
def test_kernel_equals_the_torch_reference_bit_for_bit(dtype, shape, threads):
    pytest.importorskip("numba")
    keys = [point_key(2**64 - 5, 1, a) for a in range(shape[0])]  # keys above 2^63 too
    signs = [(-1) ** a for a in range(shape[0])]
    base = torch.randn(shape[1:], dtype=dtype, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"signs": signs}, {"signs": signs, "base": base}):
        fast = uniform_(torch.empty(shape, dtype=dtype), keys, HALF, **kw)
        reference = uniform_(torch.empty(shape, dtype=dtype), keys, HALF, use_numba=False, **kw)
        assert torch.equal(fast, reference)
    # base + Δ rounds as torch's addition does
    delta = uniform_(torch.empty(shape, dtype=dtype), keys, HALF, signs=signs)
    assert torch.equal(fast, base + delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_torch_arithmetic_equals_the_eager_one_bit_for_bit(dtype):
    """``compiled=True`` (torch.compile; one kernel on a GPU) gives the eager bits, also
    with a base, which stays outside the compiled part (no fused multiply-add)."""
    shape = (4, 3, 7)  # an odd count per row
    keys = [point_key(2**64 - 5, 1, a) for a in range(shape[0])]
    signs = [1, -1, 1, -1]
    base = torch.randn(shape[1:], dtype=dtype, generator=torch.Generator().manual_seed(0))
    for kw in ({"signs": signs}, {"signs": signs, "base": base}):
        eager = uniform_(torch.empty(shape, dtype=dtype), keys, HALF, use_numba=False, **kw)
        compiled = uniform_(
            torch.empty(shape, dtype=dtype), keys, HALF, use_numba=False, compiled=True, **kw
        )
        assert torch.equal(compiled, eager)


def test_range_grid_and_moments():
    u = _draw(2**20)
    assert bool((u.abs() < HALF).all())
    cells = _draw(2**20, half=1.0) * 2**BITS  # exact: the odd integers 2u + 1 - 2^24
    assert torch.equal(cells, cells.round()) and bool((cells.remainder(2) == 1).all())
    assert cells.unique().numel() > 0.9 * 2**20  # 24 bits: few repeats among 2^20 draws
    n = len(u)
    assert abs(float(u.mean())) < 5 * HALF / math.sqrt(3 * n)
    assert abs(float(u.var()) / (HALF**2 / 3) - 1) < 5 * math.sqrt(0.8 / n)


def test_uniform_marginal():
    u = _draw(2**18).numpy()
    assert stats.kstest(u, stats.uniform(-HALF, 2 * HALF).cdf).pvalue > 1e-3
    counts = np.histogram(u, bins=64, range=(-HALF, HALF))[0]
    assert stats.chisquare(counts).pvalue > 1e-3
    # the low bits too: the last 4 of the 24 are uniform
    cells = _draw(2**18, half=1.0).numpy() * 2**BITS
    low = ((cells + 2**BITS - 1) / 2).astype(np.int64) % 16
    assert stats.chisquare(np.bincount(low, minlength=16)).pvalue > 1e-3


def test_independence_of_neighbours_points_and_steps():
    n = 2**18
    u = _draw(n)
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 784):  # the two halves of one hash, and further neighbours
        assert abs(float(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1])) < bound
    pairs = np.histogram2d(u[0::2].numpy(), u[1::2].numpy(), bins=8)[0]
    assert stats.chisquare(pairs.ravel()).pvalue > 1e-3
    generator = torch.Generator().manual_seed(0)
    steps = [draw_key(generator) for _ in range(3)]
    assert len(set(steps)) == 3
    draws = [_draw(n, point_key(k, s, a)) for k in steps for s in (0, 1) for a in (0, 1)]
    corr = torch.corrcoef(torch.stack(draws))
    off_diagonal = corr - torch.diag(corr.diagonal())
    assert float(off_diagonal.abs().max()) < bound


def test_a_seeded_generator_reproduces_the_draws():
    def draws(seed):
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        ple = PartialLocalEntropy(model, R=0.2, y=2, generator=torch.Generator().manual_seed(seed))
        return [ple.sample() for _ in range(2)]

    first, again, other = draws(1), draws(1), draws(2)
    for a, b, c in zip(first, again, other, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert not any(torch.equal(a[n], c[n]) for n in a)
    assert not torch.equal(first[0]["0.weight"], first[1]["0.weight"])  # a new key each step


@pytest.mark.parametrize("gamma", [None, 3.0])
def test_antithetic_pairs_are_exact_negations(gamma):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    box = {"R": 0.2} if gamma is None else {"gamma": gamma}
    ple = PartialLocalEntropy(
        model, y=4, antithetic=True, generator=torch.Generator().manual_seed(0), **box
    )
    for delta in ple.sample().values():
        assert torch.equal(delta[2:], -delta[:2])
        assert not torch.equal(delta[0], delta[1])
    with pytest.raises(InputError, match="y must be even"):
        PartialLocalEntropy(model, R=0.2, y=3, antithetic=True)


def test_antithetic_marginal_stays_uniform():
    model = nn.Sequential(nn.Linear(64, 64))
    ple = PartialLocalEntropy(
        model, R=HALF, y=2, antithetic=True, generator=torch.Generator().manual_seed(4)
    )
    delta = ple.sample()["0.weight"]
    uniform = stats.uniform(-HALF, 2 * HALF).cdf
    for half in (delta[0], delta[1]):  # ΔW and -ΔW, each uniform in the box
        assert stats.kstest(half.flatten().double().numpy(), uniform).pvalue > 1e-3


def _quadratic_case():
    """L(W) = mean_i ||W x_i - t_i||^2 of a bias-free Linear, in float64."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False)).double()
    x = torch.randn(24, 5, dtype=torch.float64, generator=g)
    t = torch.randn(24, 3, dtype=torch.float64, generator=g)
    return model, x, t


def _squared_error(out, target):
    return ((out - target) ** 2).sum(1)


@pytest.mark.parametrize("route", ["naive", "prefix"])
def test_antithetic_closed_form_on_a_quadratic(route):
    """A pair's mean is L(W) + mean_i ||ΔW x_i||² exactly: the PLA gradient is ∇L(W) at
    every draw, and the loss has the expectation L(W) + y/(y+1) · out · R²/3 · mean ||x||²
    with or without pairs (both unbiased for M23), pairs with the smaller variance."""
    model, x, t = _quadratic_case()
    R, y = 0.3, 4
    model.zero_grad()
    _squared_error(model(x), t).mean().backward()
    plain = model[0].weight.grad.clone()
    base = float(_squared_error(model(x), t).mean().detach())
    expected = base + y / (y + 1) * 3 * R**2 / 3 * float((x**2).sum(1).mean())
    samples = {}
    for antithetic in (False, True):
        ple = PartialLocalEntropy(
            model,
            base_loss=_squared_error,
            layers=["0"],
            R=R,
            y=y,
            batching=route,
            antithetic=antithetic,
            generator=torch.Generator().manual_seed(1),
        )
        values, gaps = [], []
        for _ in range(400):
            model.zero_grad()
            loss = ple(x, t)
            loss.backward()
            values.append(float(loss.detach()))
            gaps.append(float((model[0].weight.grad - plain).abs().max()))
        values = torch.tensor(values)
        se = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - expected) < 4 * se
        samples[antithetic] = (values, max(gaps))
    assert samples[True][1] < 1e-13  # the gradient is ∇L(W), exactly up to rounding
    assert samples[False][1] > 1e-3  # without pairs it is not
    assert float(samples[True][0].var()) < 0.5 * float(samples[False][0].var())


def _rank_draws(rank, world, path):
    torch.manual_seed(5)  # the global generator, seeded alike on every rank
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2))
    ple = PartialLocalEntropy(model, R=0.1, y=2, antithetic=True)
    draws = torch.cat([d.flatten() for _ in range(2) for d in ple.sample().values()])
    gathered = [torch.empty_like(draws) for _ in range(world)]
    torch.distributed.all_gather(gathered, draws)
    if rank == 0:
        torch.save(gathered, path)


def test_equal_draws_on_two_gloo_ranks(tmp_path):
    path = tmp_path / "draws.pt"
    spawn(_rank_draws, tmp_path, str(path))
    first, second = torch.load(path)
    assert torch.equal(first, second) and first.abs().max() > 0


def test_without_numba_the_torch_route_warns_once(monkeypatch):
    monkeypatch.setattr(perturbations, "_numba_kernel", lambda parallel: None)
    perturbations._warn_slow.cache_clear()
    with pytest.warns(UserWarning, match="numba is not installed"):
        uniform_(torch.empty(1, 2**16), [3], 1.0)
    perturbations._warn_slow.cache_clear()


def test_no_points_give_empty_draws():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    for antithetic in (False, True):
        ple = PartialLocalEntropy(model, R=0.2, y=0, antithetic=antithetic)
        assert [tuple(d.shape) for d in ple.sample().values()] == [(0, 5, 6), (0, 3, 5)]


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError, match="float32/float64"):
        uniform_(torch.empty(1, 4, dtype=torch.float16), [1], 1.0)
    with pytest.raises(ValueError, match="keys and signs"):
        uniform_(torch.empty(2, 4), [1], 1.0)
    with pytest.raises(ValueError, match="base has shape"):
        uniform_(torch.empty(1, 4), [1], 1.0, base=torch.zeros(3))


def test_one_torch_thread_never_launches_numbas_thread_pool():
    """On one torch thread the kernels are serial and numba's pool stays unlaunched (its
    OpenMP layer shares the runtime with torch: launched, it made one-thread sweep runs
    compute on two threads); on two, the parallel kernels launch it."""
    pytest.importorskip("numba")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "import numba.np.ufunc.parallel as pool\n"
        "from sgdgeom.optim.perturbations import uniform_\n"
        "from sgdgeom.monitors.temperature import l1_norms\n"
        "uniform_(torch.empty(3, 1000), [1, 2, 3], 0.1); l1_norms([torch.randn(100)])\n"
        "print(pool._is_initialized)\n"
        "torch.set_num_threads(2); uniform_(torch.empty(3, 1000), [1, 2, 3], 0.1)\n"
        "print(pool._is_initialized)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
