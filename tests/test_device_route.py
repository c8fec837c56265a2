"""The device-synchronised step of DiffusionMetricSGD (``sync="device"``, the default on an
accelerator), run on the CPU against the dense reference: the device-side bounds on
``λ_max``, the update, no host read inside a step, and the deferred refusals."""

from __future__ import annotations

import math

import pytest
import torch

from sgdgeom.errors import InputError
from sgdgeom.linalg import compiled_bounds, top_eigenvalue_bounds
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import per_sample_loss
from tests.cases import make_case
from tests.reference import per_sample_gradients
from tests.test_optim import dense_update, flat, loss_and_backward


def _psd(spectrum: list[float], n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    values = torch.zeros(n, dtype=torch.float64)
    values[: len(spectrum)] = torch.tensor(spectrum, dtype=torch.float64)
    return (Q * values) @ Q.T


@pytest.mark.parametrize(
    ("spectrum", "n"),
    [
        ([3.0, 1.0, 0.5], 40),  # a gap
        ([1.0] * 64, 64),  # flat: the upper bound is loosest, n^(1/p)
        ([1.0, 0.999, 0.998, 0.5], 30),  # a cluster at the top: the lower bound is loosest
        ([2.0], 1),
        (list(torch.logspace(0, -8, 256).tolist()), 256),
    ],
)
def test_device_bounds_bracket_lambda_max_within_the_slack(spectrum, n):
    K = _psd(spectrum, n)
    lower, upper = top_eigenvalue_bounds(K, slack=0.01)
    top = max(spectrum)
    assert lower <= top * (1 + 1e-12) and top <= upper * (1 + 1e-12)
    assert upper <= 1.01 * top
    assert lower >= 0.99 * top  # a Rayleigh quotient at K^p's column: close here too
    assert lower.device == K.device and lower.dim() == upper.dim() == 0


def test_device_bounds_of_zero_and_non_finite_matrices():
    assert [float(b) for b in top_eigenvalue_bounds(torch.zeros(5, 5))] == [0.0, 0.0]
    K = _psd([1.0], 4)
    K[0, 1] = math.nan
    assert math.isnan(float(top_eigenvalue_bounds(K)[1]))
    K[0, 1] = math.inf
    assert math.isnan(float(top_eigenvalue_bounds(K)[1]))


def _two_steps(case, **options):
    opt = DiffusionMetricSGD(case.model, lr=0.1, sync="device", **options)
    loss_and_backward(case)
    opt.step()  # the checked, unfused step
    opt.zero_grad()
    return opt


def _upper_bound_eps(case) -> float:
    """``0.5 / λ̄`` from the dense Gram matrix of explicit per-sample gradients, on a twin
    of the model (the optimizer's hooks and fused layers stay out of the reference)."""
    twin = make_case(case.name)
    twin.model.load_state_dict(case.model.state_dict())
    G = per_sample_gradients(twin.model, per_sample_loss(case.loss), case.x, case.y)
    centred = G - G.mean(0)
    return 0.5 / float(top_eigenvalue_bounds(centred @ centred.T / len(G))[1])


@pytest.mark.parametrize("mode", ["weak", "exact"])
@pytest.mark.parametrize("name", ["mlp-relu", "small-cnn", "transformer", "partly-frozen"])
def test_device_route_equals_dense_update_at_its_eps(name, mode):
    """ε auto is 0.5/λ̄ (the device-side upper bound); at that ε the update is the dense
    one, and ε λ_max lies in [0.5/1.01, 0.5]."""
    case = make_case(name)
    opt = _two_steps(case, eps="auto", inverse=mode)
    eps = _upper_bound_eps(case)
    expected, _ = dense_update(case, eps, mode, lr=0.1)
    loss_and_backward(case)
    opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)
    stats = opt.stats
    assert stats["eps"] == pytest.approx(eps, rel=1e-9)
    assert stats["lambda_max"] <= stats["lambda_bound"] * (1 + 1e-12)
    assert stats["lambda_bound"] <= 1.01 * stats["lambda_max"]
    assert 0.5 / 1.01 <= stats["eps"] * stats["lambda_max"] <= 0.5 + 1e-12


@pytest.mark.parametrize("mode", ["weak", "exact"])
def test_device_route_with_a_fixed_eps_equals_dense_update(mode):
    case = make_case("mlp-relu")
    opt = _two_steps(case, eps="auto", inverse=mode)
    eps = 0.9 * 2 * _upper_bound_eps(case)  # 0.9 / λ̄ < 1 / λ_max
    opt.param_groups[0]["eps"] = eps
    expected, _ = dense_update(case, eps, mode, lr=0.1)
    loss_and_backward(case)
    opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == eps


_HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy")


@pytest.mark.parametrize(("eps", "mode"), [("auto", "weak"), ("auto", "exact"), ("fixed", "exact")])
def test_a_device_route_step_reads_nothing_on_the_host(mode, eps, monkeypatch):
    """Every way a tensor's value reaches Python fails inside steps 2 and 3 (the first is
    the checked one); on a GPU each would wait for the device. The last step's flag is
    read before, as the next step reads it: by then the device has long finished it. (The
    weak step with a fixed ε reads tr D where the matrix-free route pays, as here on the
    transformer's stored rows: see ``_matrix_free_pays``.)"""
    case = make_case("transformer")
    opt = _two_steps(case, eps="auto" if eps == "auto" else 1e-6, inverse=mode)

    def refuse(self, *args, **kwargs):
        pytest.fail("a host read inside a device-route step")

    for _ in range(2):
        loss_and_backward(case)
        assert opt.stats["eps"] > 0  # the last step's flag, read here as step() would
        with monkeypatch.context() as patch:
            for name in _HOST_READS:
                patch.setattr(torch.Tensor, name, refuse)
            opt.step()
        opt.zero_grad()


def test_a_refused_device_step_moves_nothing_and_raises_at_the_next_step():
    case = make_case("mlp-relu")
    opt = _two_steps(case, eps="auto", inverse="weak", momentum=0.9)
    opt.param_groups[0]["eps"] = 1e6  # far above 1/λ_max
    loss_and_backward(case)
    before = flat(case.model)
    opt.step()  # no error yet: the device has not been asked
    assert torch.equal(flat(case.model), before)
    loss_and_backward(case)
    with pytest.raises(InputError, match="last step was refused.*at or above 1/λ_max"):
        opt.step()
    opt.param_groups[0]["eps"] = "auto"  # the error was raised once; training goes on
    opt.step()
    assert not torch.equal(flat(case.model), before)


def test_a_non_finite_device_step_moves_nothing_and_stats_raise():
    case = make_case("mlp-relu")
    opt = _two_steps(case, eps="auto", inverse="exact", momentum=0.9)
    loss_and_backward(case)
    opt.step()  # a momentum buffer to keep finite
    opt.zero_grad()
    case.x[0, 0] = math.nan
    loss_and_backward(case)
    before = flat(case.model)
    opt.step()
    assert torch.equal(flat(case.model), before)
    with pytest.raises(InputError, match="refused.*not finite"):
        opt.stats  # noqa: B018 - the read raises
    assert all(bool(state["momentum_buffer"].isfinite().all()) for state in opt.state.values())


def test_sync_is_checked():
    case = make_case("mlp-relu")
    with pytest.raises(InputError, match="Invalid sync"):
        DiffusionMetricSGD(case.model, lr=0.1, sync="yes")


def test_compiled_bounds_equal_the_eager_ones():
    K = _psd([3.0, 1.0, 0.5], 24)
    for got, expected in zip(compiled_bounds(K), top_eigenvalue_bounds(K), strict=True):
        assert float(got) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("mode", ["weak", "exact"])
def test_compiled_device_route_equals_dense_update(mode):
    case = make_case("mlp-relu")
    opt = _two_steps(case, eps="auto", inverse=mode, compile=True)
    eps = _upper_bound_eps(case)
    expected, _ = dense_update(case, eps, mode, lr=0.1)
    loss_and_backward(case)
    opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


def test_a_capturable_step_reads_nothing_and_equals_dense_update(monkeypatch):
    """capturable=True (for torch.cuda.graph): the step of the device route with no host
    read at all, not even the last step's flag; the same update as the dense reference."""
    case = make_case("transformer")
    opt = _two_steps(case, eps="auto", inverse="exact", capturable=True)
    eps = _upper_bound_eps(case)
    expected, _ = dense_update(case, eps, "exact", lr=0.1)
    loss_and_backward(case)

    def refuse(self, *args, **kwargs):
        pytest.fail("a host read inside a capturable step")

    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, refuse)
        opt.step()
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)


def test_capturable_refusals_accumulate_until_stats_are_read():
    case = make_case("mlp-relu")
    opt = _two_steps(case, eps="auto", inverse="weak", capturable=True)
    opt.param_groups[0]["eps"] = 1e6
    before = flat(case.model)
    for _ in range(2):  # neither step raises (a replayed graph could not)
        loss_and_backward(case)
        opt.step()
        opt.zero_grad()
    assert torch.equal(flat(case.model), before)
    with pytest.raises(InputError, match="since the last read of stats was refused"):
        opt.stats  # noqa: B018 - the read raises
    opt.param_groups[0]["eps"] = "auto"
    loss_and_backward(case)
    opt.step()
    assert opt.stats["eps"] > 0  # the flag was cleared by the read that raised


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"capturable": True, "sync": "host"}, "sync='host' is not"),
        ({"capturable": True, "params": "list"}, "needs the model"),
    ],
)
def test_capturable_refuses_what_it_cannot_capture(options, message):
    case = make_case("mlp-relu")
    params = list(case.model.parameters()) if options.pop("params", None) else case.model
    with pytest.raises(InputError, match=message):
        DiffusionMetricSGD(params, lr=0.1, **options)


def test_a_fixed_eps_on_a_gram_matrix_with_a_nan_off_its_diagonal_is_not_finite():
    """The device check names the cause: NaN entries, not an ε too large."""
    from sgdgeom.diffusion import DiffusionMatrix
    from sgdgeom.metric import DiffusionMetric

    case = make_case("mlp-relu")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    K = D.gram()
    K[0, 1] = K[1, 0] = math.nan  # the diagonal, and so tr D, stays finite
    metric = DiffusionMetric(D, eps=1e-6, sync="device")
    assert int(metric.status) == DiffusionMetric.NOT_FINITE
    with pytest.raises(InputError, match="not finite"):
        metric.check()


def test_the_device_route_on_tied_weights_through_the_closure_route():
    """A weight used outside its module: the closure's stored per-sample rows on the device
    route, against the dense update at ε = 0.5/λ̄."""
    case = make_case("tied-autoencoder")
    eps = _upper_bound_eps(case)
    expected, _ = dense_update(case, eps, "exact")
    opt = DiffusionMetricSGD(list(case.model.parameters()), lr=1.0, inverse="exact", sync="device")
    opt.step(lambda: per_sample_loss(case.loss)(case.model(case.x), case.y))
    torch.testing.assert_close(flat(case.model), expected, rtol=0, atol=1e-10)
    assert opt.stats["eps"] == pytest.approx(eps, rel=1e-9)
