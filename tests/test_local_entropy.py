"""Partial local entropy against hand computations at the same perturbations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.optim import local_entropy
from sgdgeom.optim.local_entropy import (
    PartialLocalEntropy,
    gaussian_local_entropy,
    kernel_distance,
    local_free_entropy,
    m_loss,
    split_sizes,
)
from sgdgeom.persample import per_sample_loss, plan_layers
from sgdgeom.persample.layers.linear import LinearRule
from tests.cases import CASE_NAMES, make_case
from tests.distributed import spawn


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def hand_gradient(model, x, y, deltas, kind, R, k):
    """Σ_a w_a ∇L(W + ΔW^a) with the weights of each form, one backward per point."""
    names = [n for n, _ in model.named_parameters()]
    losses, grads = [], []
    for a in range(len(next(iter(deltas.values()))) + 1):
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in copy_.named_parameters():
                if a > 0 and n in deltas:
                    p.add_(deltas[n][a - 1])
        loss = nn.functional.cross_entropy(copy_(x), y)
        grads.append(torch.autograd.grad(loss, list(copy_.parameters())))
        losses.append(loss.item())
    losses = torch.tensor(losses, dtype=torch.float64)
    d = torch.zeros(len(losses), dtype=torch.float64)
    if k is not None:
        d[1:] = sum(kernel_distance(deltas[n], R, k) for n in deltas)
    if kind == "pla":
        weights = torch.exp(-d) / len(losses)
        value = float((weights * losses).sum())
    else:
        weights = torch.softmax(-losses - d, 0)
        value = math.log(len(losses)) - float(torch.logsumexp(-losses - d, 0))
    total = [
        sum(float(w) * g[i] for w, g in zip(weights, grads, strict=True)) for i in range(len(names))
    ]
    return value, total


@pytest.mark.parametrize("route", ["naive", "prefix"])
@pytest.mark.parametrize(
    ("kind", "k"), [("pla", None), ("plea", None), ("pla", 30.0), ("plea", 30.0)]
)
@pytest.mark.parametrize("layers", [["2"], ["0", "4"], "all"])
@pytest.mark.parametrize("batched", [False, True])
def test_gradient_equals_hand_computation(route, kind, k, layers, batched, monkeypatch):
    """Also through the branch blocks' batched product (accelerators) after the branch point."""
    monkeypatch.setattr(local_entropy, "_batched_split", lambda h: batched)
    model, x, y = setup()
    R = 0.3
    ple = PartialLocalEntropy(
        model,
        layers=layers,
        R=R,
        y=3,
        kind=kind,
        k=k,
        batching=route,
        generator=torch.Generator().manual_seed(7),
    )
    twin = PartialLocalEntropy(
        model, layers=layers, R=R, y=3, kind=kind, k=k, generator=torch.Generator().manual_seed(7)
    )
    deltas = twin.sample()  # the draws ple is about to make
    expected_value, expected = hand_gradient(model, x, y, deltas, kind, R, k)
    loss = ple(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected_value, rel=1e-12)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_prefix_equals_naive_and_weights_are_restored():
    model, x, y = setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = {}
    for route in ("naive", "prefix"):
        model.zero_grad()
        ple = PartialLocalEntropy(
            model,
            layers=["2", "4"],
            R=0.2,
            y=4,
            batching=route,
            generator=torch.Generator().manual_seed(3),
        )
        loss = ple(x, y)
        loss.backward()
        results[route] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n])  # bit-exact
        assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(results["prefix"][0], results["naive"][0], rtol=1e-13, atol=0)
    for a, b in zip(results["prefix"][1], results["naive"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_y_zero_is_the_base_loss():
    model, x, y = setup()
    base = nn.functional.cross_entropy(model(x), y)
    for kind in ("pla", "plea"):
        for k in (None, 10.0):
            for route in ("auto", "naive", "prefix", "split")[: 4 if kind == "pla" else 3]:
                ple = PartialLocalEntropy(model, R=0.5, y=0, kind=kind, k=k, batching=route)
                torch.testing.assert_close(ple(x, y), base, rtol=1e-14, atol=0)


def test_biases_are_never_smoothed():
    model, _x, _y = setup()
    ple = PartialLocalEntropy(model, R=0.1, y=2)
    assert set(ple.sample()) == {"0.weight", "2.weight", "4.weight"}
    with pytest.raises(ValueError, match="biases are never smoothed"):
        PartialLocalEntropy(model, layers=[], R=0.1, mask={"0.bias": torch.ones(6, dtype=bool)})


def test_mask_selects_single_weights():
    model, _, _ = setup()
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[2, 3] = True
    ple = PartialLocalEntropy(
        model,
        layers=[],
        R=0.1,
        y=5,
        mask={"2.weight": mask},
        generator=torch.Generator().manual_seed(0),
    )
    delta = ple.sample()["2.weight"]
    assert torch.count_nonzero(delta[:, ~mask]) == 0
    assert torch.all(delta[:, 2, 3].abs() <= 0.1) and torch.all(delta[:, 2, 3] != 0)


def test_kernel_tends_to_the_box_indicator():
    R = 1.0
    inside = torch.tensor([[0.0, 0.5, -0.9]], dtype=torch.float64)
    outside = torch.tensor([[0.0, 1.1, 0.0]], dtype=torch.float64)
    for k in (8.0, 64.0, 512.0):
        k_in = float(torch.exp(-kernel_distance(inside, R, k)))
        k_out = float(torch.exp(-kernel_distance(outside, R, k)))
    assert k_in == pytest.approx(1.0, abs=1e-12)  # (M8): 1 inside the box
    assert k_out < 1e-40  # and 0 outside
    values = [float(torch.exp(-kernel_distance(inside, R, k))) for k in (2.0, 8.0, 32.0)]
    assert values[0] < values[1] < values[2]  # monotone approach


def test_pla_expectation_on_a_quadratic_loss():
    """E L_PLA = L(W) + (y/(1+y)) (R²/6) tr H_U for a quadratic L (uniform noise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, t = (
        torch.randn(20, 4, dtype=torch.float64, generator=g),
        torch.randn(20, 2, dtype=torch.float64, generator=g),
    )
    R, y = 0.4, 3
    ple = PartialLocalEntropy(
        model,
        "mse",
        layers=["1"],
        R=R,
        y=y,
        batching="naive",
        generator=torch.Generator().manual_seed(2),
    )
    base = nn.functional.mse_loss(model(x), t)
    weight = model[1].weight

    def loss_of(w):
        return nn.functional.mse_loss(nn.functional.linear(model[0](x), w, model[1].bias), t)

    trace = float(
        torch.autograd.functional.hessian(loss_of, weight.detach())
        .reshape(weight.numel(), -1)
        .diagonal()
        .sum()
    )
    expected = base.item() + y / (1 + y) * R**2 / 6 * trace
    with torch.no_grad():
        draws = torch.tensor([float(ple(x, t)) for _ in range(3000)], dtype=torch.float64)
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - expected) < 4 * se
    assert abs(expected - base.item()) > 20 * se  # the test can tell the smoothing apart


@pytest.mark.parametrize("layers", [["2"], ["0", "2"]])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("batch", [12, 13, 14])
def test_split_batch_points_and_unbiased_objective(batch, batched, layers, monkeypatch):
    """Chunk a of the batch sees W + ΔW^a (chunk 0: W): value and gradient by hand, through
    the loop of products (CPU) and the batched product (accelerators)."""
    monkeypatch.setattr(local_entropy, "_batched_split", lambda h: batched)
    model, _, _ = setup()
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    ple = PartialLocalEntropy(
        model,
        layers=layers,
        R=0.3,
        y=2,
        batching="split",
        generator=torch.Generator().manual_seed(5),
    )
    twin = PartialLocalEntropy(
        model, layers=layers, R=0.3, y=2, generator=torch.Generator().manual_seed(5)
    )
    deltas = twin.sample()
    sizes = split_sizes(batch, 2)
    assert sum(sizes) == batch and sizes[1] == sizes[2] == batch // 3 <= sizes[0]
    expected, grads = [], []
    for a, idx in enumerate(torch.split(torch.arange(batch), sizes)):
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            for layer in layers if a else []:
                copy_[int(layer)].weight.add_(deltas[f"{layer}.weight"][a - 1])
        loss = nn.functional.cross_entropy(copy_(x[idx]), y[idx]) / 3
        grads.append(torch.autograd.grad(loss, list(copy_.parameters())))
        expected.append(loss.item())
    loss = ple(x, y)
    assert loss.item() == pytest.approx(sum(expected), rel=1e-12)
    loss.backward()
    for p, *by_point in zip(model.parameters(), *grads, strict=True):
        torch.testing.assert_close(p.grad, sum(by_point), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least y\\+1 = 3 samples"):
        split_sizes(2, 2)


def test_bad_settings():
    model, _x, _y = setup()
    with pytest.raises(ValueError, match="R must be a finite number > 0"):
        PartialLocalEntropy(model, R=0)
    with pytest.raises(ValueError, match="exactly one of R"):
        PartialLocalEntropy(model)
    with pytest.raises(ValueError, match="exactly one of R"):
        PartialLocalEntropy(model, R=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        PartialLocalEntropy(model, gamma=float("inf"))
    with pytest.raises(ValueError, match="Gaussian distance has none"):
        PartialLocalEntropy(model, gamma=1.0, k=5.0)
    with pytest.raises(ValueError, match="kind must be"):
        PartialLocalEntropy(model, R=0.1, kind="kernel")
    with pytest.raises(ValueError, match="no weight layers named"):
        PartialLocalEntropy(model, layers=["fc9"], R=0.1)
    with pytest.raises(ValueError, match="PLA only"):
        PartialLocalEntropy(model, R=0.1, kind="plea", batching="split")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="use batching='naive'"):
        PartialLocalEntropy(conv, layers=["0"], R=0.1, batching="prefix")
    assert PartialLocalEntropy(conv, layers=["0"], R=0.1).batching == "naive"


def test_estimators_have_standard_errors():
    model, x, y = setup()
    ple = PartialLocalEntropy(
        model, layers=["2"], R=0.05, y=4, generator=torch.Generator().manual_seed(0)
    )
    base = nn.functional.cross_entropy(model(x), y).item()
    value, se = m_loss(ple, x, y, repeats=16)
    assert abs(value - base) < 0.05 and se > 0
    f, f_se = local_free_entropy(ple, x, y, samples=64)
    assert abs(f - base) < 0.05 and 0 < f_se < 0.01  # tiny R: F ≈ L(W) (constant left out)
    wide = PartialLocalEntropy(
        model, layers=["2"], R=3.0, generator=torch.Generator().manual_seed(0)
    )
    assert local_free_entropy(wide, x, y, samples=64)[0] > f  # flatter average: higher loss
    g, g_se = gaussian_local_entropy(
        model, x, y, gamma=1e6, samples=32, generator=torch.Generator().manual_seed(0)
    )
    assert abs(g - base) < 0.01 and g_se >= 0


def test_loss_config_trains_and_is_reproducible():
    from sgdgeom.errors import ConfigError
    from sgdgeom.experiments.config import parse_config
    from sgdgeom.experiments.runner import run_training

    base = {
        "name": "pla",
        "seed": 2,
        "data": {"name": "digits", "batch_size": 32, "n_train": 256, "n_test": 128},
        "model": {"name": "mlp", "widths": [16, 16]},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 2, "device": "cpu"},
    }
    config = parse_config({**base, "loss": {"name": "plea", "layers": ["fc2"], "R": 0.05}})
    first = run_training(config, None, progress=False)
    assert run_training(config, None, progress=False) == first
    plain = run_training(parse_config(base), None, progress=False)
    assert plain != first
    with pytest.raises(ConfigError, match="needs exactly one of R"):
        parse_config({**base, "loss": {"name": "pla"}})
    with pytest.raises(ConfigError, match="needs exactly one of R"):
        parse_config({**base, "loss": {"name": "pla", "R": 0.1, "gamma": 10.0}})
    with pytest.raises(ConfigError, match="Gaussian distance"):
        parse_config({**base, "loss": {"name": "pla", "gamma": 10.0, "k": 3.0}})
    gaussian = parse_config({**base, "loss": {"name": "plea", "layers": ["fc2"], "gamma": 400.0}})
    assert run_training(gaussian, None, progress=False) not in (first, plain)
    with pytest.raises(ConfigError, match=r"loss\.\w+: unknown key; allowed: name$"):
        parse_config({**base, "loss": {"name": "cross_entropy", "R": 0.1}})


def test_perturbed_passes_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model)
    reference(x)  # one plain training-mode pass
    ple = PartialLocalEntropy(
        model, layers=["0"], R=0.5, y=4, generator=torch.Generator().manual_seed(0)
    )
    assert ple.batching == "naive"  # auto: train-mode BatchNorm would mix batched branches
    with pytest.raises(UnsupportedModelError, match="would mix the branches"):
        PartialLocalEntropy(model, layers=["0"], R=0.5, batching="prefix")(x, y)
    ple(x, y).backward()
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def _ddp_worker(rank, world, results):
    model, x, y = setup()
    half = len(x) // world
    ddp = nn.parallel.DistributedDataParallel(model)
    ple = PartialLocalEntropy(
        ddp, layers=["module.2"], R=0.3, y=3, generator=torch.Generator().manual_seed(11)
    )  # same seed
    ple(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], results)


def test_ddp_averages_to_the_global_batch_gradient(tmp_path):
    results = tmp_path / "grads.pt"
    spawn(_ddp_worker, tmp_path, str(results))
    model, x, y = setup()
    ple = PartialLocalEntropy(
        model, layers=["2"], R=0.3, y=3, generator=torch.Generator().manual_seed(11)
    )
    ple(x, y).backward()
    for got, expected in zip(torch.load(results), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected.grad, rtol=0, atol=1e-12)


def _linear_layers(model):
    return [
        layer.name
        for layer in plan_layers(model)
        if isinstance(layer.rule, LinearRule) and "weight" in layer.names
    ]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_prefix_gradient_equals_naive_on_every_zoo_model(name):
    """Smoothing every trainable Linear weight: the batched route, where it is taken, has the
    naive route's loss and gradient; where it cannot be exact, auto takes the naive one."""
    results = {}
    for route in ("naive", "auto"):
        case = make_case(name)
        ple = PartialLocalEntropy(
            case.model,
            per_sample_loss(case.loss),
            layers=_linear_layers(case.model),
            R=0.2,
            y=3,
            batching=route,
            generator=torch.Generator().manual_seed(5),
        )
        loss = ple(case.x, case.y)
        loss.backward()
        grads = [p.grad for p in case.model.parameters() if p.requires_grad]
        results[route] = (loss.detach(), grads, ple.batching)
    naive = ("tied-autoencoder", "transformer", "sequence-first")
    expected_route = "naive" if name in naive else "prefix"
    assert results["auto"][2] == expected_route
    torch.testing.assert_close(results["auto"][0], results["naive"][0], rtol=1e-12, atol=0)
    for a, b in zip(results["auto"][1], results["naive"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_explicit_prefix_names_the_tied_weight():
    case = make_case("tied-autoencoder")
    ple = PartialLocalEntropy(case.model, layers=["enc"], R=0.2, batching="prefix")
    with pytest.raises(UnsupportedModelError, match=r"enc\.weight .*outside that module"):
        ple(case.x, case.y)
    residual = make_case("transformer")
    ple = PartialLocalEntropy(
        residual.model, layers=["layers.layers.0.linear1"], R=0.2, batching="prefix"
    )
    with pytest.raises(UnsupportedModelError, match="skip connection"):
        ple(residual.x, residual.y)


# --------------------------------------------------------------------------- closed forms


def test_kernel_matches_its_closed_form():
    """(M5)-(M6) evaluated literally, with numpy, against ``exp(−kernel_distance)``."""
    rng = np.random.default_rng(0)
    R = 0.7
    delta = rng.uniform(-2 * R, 2 * R, size=(50, 4))
    for k in (0.5, 3.0, 20.0):
        # 1 − 1/(1 + e^{−z}) = 1/(1 + e^{z}): the same factor, without the cancellation
        factors = 1 / ((1 + np.exp(2 * k * (delta - R))) * (1 + np.exp(-2 * k * (delta + R))))
        kernel = factors.prod(1)
        ours = torch.exp(-kernel_distance(torch.tensor(delta), R, k)).numpy()
        np.testing.assert_allclose(ours, kernel, rtol=1e-12, atol=1e-300)
    assert kernel.min() < 1e-6 and kernel.max() > 0.5  # k = 20: both sides of the edge


class QuadraticLoss:
    """``L(w) = c + Σ_j (½ a_j w_j² − b_j w_j)``: a bias-free ``Linear(3, 1)`` with the
    squared error on rows ``s_j e_j`` (``m`` rows per coordinate), so that the Hessian
    ``diag(a)`` is diagonal and every expectation factorises into 1-D integrals."""

    def __init__(self, seed=0, m=4):
        gen = torch.Generator().manual_seed(seed)
        scales = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        self.x = torch.diag(scales).repeat(m, 1)  # (3m, 3)
        self.t = torch.randn(len(self.x), dtype=torch.float64, generator=gen)
        self.model = nn.Linear(3, 1, bias=False).double()
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, 3, dtype=torch.float64, generator=gen) * 0.5)
        n = len(self.x)
        rows = self.x.numpy()
        self.a = (rows**2).sum(0) / n
        self.b = (rows * self.t.numpy()[:, None]).sum(0) / n
        self.c = float((self.t**2).sum()) / (2 * n)
        self.w = self.model.weight.detach().numpy()[0]

    @staticmethod
    def loss(out, target):
        return 0.5 * (out[:, 0] - target) ** 2

    def value(self, scale=1.0):
        """``L(w)`` times ``scale``, in closed form."""
        return scale * (self.c + float(np.sum(0.5 * self.a * self.w**2 - self.b * self.w)))

    def box_mean_exp(self, R):
        """``E_{Δ∼U[−R,R]³} e^{−L(w+Δ)}``: a product of erf integrals."""
        from scipy.special import erf

        a, b, w = self.a, self.b, self.w
        root = np.sqrt(a / 2)
        integral = (
            np.exp(b**2 / (2 * a))
            * np.sqrt(np.pi / (2 * a))
            * (erf(root * (w + R - b / a)) - erf(root * (w - R - b / a)))
        )
        return np.exp(-self.c) * np.prod(integral / (2 * R))

    def gaussian_mean_exp(self, variance, scale=1.0):
        """``E_{Δ∼N(0, variance I)} e^{−scale·L(w+Δ)}``: a Gaussian integral."""
        a, b, w = scale * self.a, scale * self.b, self.w
        factor = (b - a * w) ** 2 * variance / (2 * (1 + a * variance))
        return np.exp(-self.value(scale)) * np.prod(np.exp(factor) / np.sqrt(1 + a * variance))

    def kernel_mean_exp(self, R, k, half):
        """``E_{Δ∼U[−half,half]³} e^{−L(w+Δ) − d_{R,k}(Δ)}`` by 1-D quadrature (M5)."""
        from scipy.integrate import quad

        def factor(j):
            def integrand(d):
                kernel = 1 / ((1 + np.exp(2 * k * (d - R))) * (1 + np.exp(-2 * k * (d + R))))
                u = self.w[j] + d
                return np.exp(-(0.5 * self.a[j] * u**2 - self.b[j] * u)) * kernel

            return quad(integrand, -half, half, epsabs=0, epsrel=1e-12)[0] / (2 * half)

        return np.exp(-self.c) * np.prod([factor(j) for j in range(3)])


def _smoothing(problem, **settings):
    return PartialLocalEntropy(
        problem.model,
        problem.loss,
        layers="all",
        batching="naive",
        generator=torch.Generator().manual_seed(5),
        **settings,
    )


def _expected_mean_exp(problem, R=None, k=None, gamma=None):
    if gamma is not None:
        return problem.gaussian_mean_exp(1 / (2 * gamma))
    if k is None:
        return problem.box_mean_exp(R)
    return problem.kernel_mean_exp(R, k, R + local_entropy.KERNEL_MARGIN / k)


def test_quadratic_problem_is_what_it_says():
    problem = QuadraticLoss()
    value = nn.functional.linear(problem.x, problem.model.weight.detach())
    assert float(problem.loss(value, problem.t).mean()) == pytest.approx(problem.value(), 1e-14)
    assert len(problem.x) == 12 and np.allclose(problem.a, [4 / 12, 16 / 12, 36 / 12])


SETTINGS = [{"R": 0.6}, {"R": 0.6, "k": 4.0}, {"gamma": 1.5}]


@pytest.mark.parametrize("settings", SETTINGS, ids=["box", "kernel", "gaussian"])
def test_free_entropy_estimator_against_closed_forms(settings):
    """(M16)/(M18) and the Gaussian (M11) free entropy: ``−log E[e^{−L−d}]`` of the
    sampling distribution (its constant left out), against erf, quadrature or Gaussian
    integrals of the quadratic loss."""
    problem = QuadraticLoss()
    ple = _smoothing(problem, **settings)
    value, se = local_free_entropy(ple, problem.x, problem.t, samples=20000, chunk=2000)
    expected = -np.log(_expected_mean_exp(problem, **settings))
    assert abs(value - expected) < 4 * se
    assert abs(expected - problem.value()) > 20 * se  # the smoothing is visible


@pytest.mark.parametrize("settings", SETTINGS, ids=["box", "kernel", "gaussian"])
def test_m_loss_draws_against_closed_forms(settings):
    """The M-loss (M3; M14 with k; M11's Gaussian distance): for any y,
    ``E e^{−M} = (e^{−L(W)} + y E[e^{−L(W+Δ)−d(Δ)}]) / (y+1)``."""
    problem = QuadraticLoss(seed=1)
    y = 3
    ple = _smoothing(problem, kind="plea", y=y, **settings)
    with torch.no_grad():
        draws = torch.tensor([float(ple(problem.x, problem.t)) for _ in range(4000)])
    weights = torch.exp(-draws.double())
    se = float(weights.std()) / math.sqrt(len(weights))
    expected = (np.exp(-problem.value()) + y * _expected_mean_exp(problem, **settings)) / (y + 1)
    assert abs(float(weights.mean()) - expected) < 4 * se
    assert abs(expected - np.exp(-problem.value())) > 10 * se


def test_gaussian_pla_expectation_on_a_quadratic_loss():
    """PLA with the Gaussian distance: ``E L_PLA = L(W) + (y/(1+y)) ½ tr(A) / (2γ)``."""
    problem = QuadraticLoss(seed=2)
    gamma, y = 2.0, 3
    ple = _smoothing(problem, gamma=gamma, y=y)
    with torch.no_grad():
        draws = torch.tensor([float(ple(problem.x, problem.t)) for _ in range(4000)])
    expected = problem.value() + y / (1 + y) * 0.5 * problem.a.sum() / (2 * gamma)
    se = float(draws.double().std()) / math.sqrt(len(draws))
    assert abs(float(draws.double().mean()) - expected) < 4 * se
    assert abs(expected - problem.value()) > 20 * se


def test_isotropic_gaussian_free_entropy_against_its_closed_form():
    """(M1) by :func:`gaussian_local_entropy`: ``−log E_{N(0, I/γ)} e^{−βL(W+Δ)}``."""
    problem = QuadraticLoss(seed=3)
    gamma, beta = 3.0, 2.0
    value, se = gaussian_local_entropy(
        problem.model,
        problem.x,
        problem.t,
        gamma=gamma,
        beta=beta,
        base_loss=problem.loss,
        samples=20000,
        generator=torch.Generator().manual_seed(0),
    )
    expected = -np.log(problem.gaussian_mean_exp(1 / gamma, scale=beta))
    assert abs(value - expected) < 4 * se
    assert abs(expected - problem.value(beta)) > 20 * se
