"""DiffusionMatrix against a dense brute-force D, on every test case, in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError, SgdgeomError, UnsupportedModelError
from sgdgeom.linalg import conjugate_gradients, top_eigenvalue
from sgdgeom.persample import capture, per_sample_loss
from sgdgeom.persample.layers.conv import ConvCall
from sgdgeom.persample.layers.linear import LinearCall
from tests.cases import CASE_NAMES, make_case
from tests.cases import routes_for as _routes
from tests.reference import (
    assert_close,
    dense_diffusion,
    dense_divergence,
    per_sample_gradients,
)


@pytest.fixture(params=CASE_NAMES)
def case(request):
    return make_case(request.param)


def routes_for(case):
    return _routes(case.name)


DENSE_DIM = 64  # above this, the generic route is compared through products, not dense()


def assert_matrix(operator, reference, route, what):
    """``operator.dense()`` against the reference; for the generic route on a larger model
    (``dense()`` costs d products, each a pass through the model with forward-mode AD) the
    same comparison through products with 8 random vectors, which any wrong entry fails."""
    if route != "generic" or reference.shape[0] <= DENSE_DIM:
        assert_close(operator.dense(), reference, what=what)
        return
    V = torch.randn(
        reference.shape[0], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    assert_close(operator @ V, reference @ V, what=f"{what} (8 random products)")


def reference(case):
    G = per_sample_gradients(case.model, per_sample_loss(case.loss), case.x, case.y)
    return G, dense_diffusion(G)


def test_matvec_dense_and_mean_gradient(case):
    G, D_ref = reference(case)
    v = torch.randn(D_ref.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for route in routes_for(case):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route, chunk_size=4)
        assert D.route == route
        assert_close(D @ v, D_ref @ v, what=f"{route} D @ v")
        assert_matrix(D, D_ref, route, f"{route} dense()")
        assert_close(D.mean_gradient(), G.mean(0), what=f"{route} mean gradient")
        V = torch.stack([v, 2 * v + 1], 1)
        assert_close(D @ V, D_ref @ V, what=f"{route} D @ V")
        as_dict = D @ D.space.unflatten(v)
        assert_close(D.space.flatten(as_dict), D_ref @ v, what=f"{route} dict matvec")


def test_symmetric_psd_and_rank_bound(case):
    _, D_ref = reference(case)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    dense = D.dense()
    assert_close(dense, dense.T, what="symmetry")
    assert torch.linalg.eigvalsh(dense).min() > -1e-12
    n, d = len(case.x), D.space.dim
    assert D.rank() <= n - 1
    if d >= n:  # generic data: the bound is attained
        assert D.rank() == n - 1 == torch.linalg.matrix_rank(D_ref, hermitian=True)


def test_gram_spectrum_equals_dense_spectrum(case):
    _, D_ref = reference(case)
    expected = torch.linalg.eigvalsh(D_ref).flip(0)
    for route in routes_for(case):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route, chunk_size=5)
        values = D.eigvalsh()
        k = min(len(values), len(expected))
        assert_close(values[:k], expected[:k], atol=1e-10, what=f"{route} Gram eigenvalues")
        assert D.lambda_max() == pytest.approx(float(expected[0]), rel=1e-10)


def test_top_k_eigenpairs_gram_and_lanczos(case):
    _, D_ref = reference(case)
    values_ref, vectors_ref = torch.linalg.eigh(D_ref)
    values_ref, vectors_ref = values_ref.flip(0), vectors_ref.flip(1)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    k = 3
    for method in (D.eigh, D.eigsh):
        values, vectors = method(k)
        assert_close(values, values_ref[:k], atol=1e-9, what=f"{method.__name__} values")
        overlap = (vectors.T @ vectors_ref[:, :k]).abs().diagonal()
        assert_close(
            overlap,
            torch.ones(k, dtype=torch.float64),
            atol=1e-6,
            what=f"{method.__name__} vectors",
        )
        assert_close(D @ vectors, vectors * values, atol=1e-9, what="D u = λ u")


def test_traces_and_layer_blocks(case):
    _, D_ref = reference(case)
    for route in routes_for(case):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route, chunk_size=3)
        assert D.trace() == pytest.approx(float(D_ref.trace()), rel=1e-10, abs=1e-14)
        assert D.trace() == pytest.approx(float(D.gram().trace()), rel=1e-9, abs=1e-14)
        traces = D.layer_traces()
        weights = D.layer_traces(weights_only=True)
        for layer in D.space.layers:
            mask = D.space.layer_mask(layer)
            block_ref = D_ref[mask][:, mask]
            assert traces[layer].trace == pytest.approx(
                float(block_ref.trace()), rel=1e-10, abs=1e-14
            )
            assert traces[layer].numel == int(mask.sum())
            wmask = D.space.layer_mask(layer, weights_only=True)
            if not wmask.any():  # only a bias trains: no weights-only entry
                assert layer not in weights
                continue
            assert weights[layer].trace == pytest.approx(
                float(D_ref[wmask][:, wmask].trace()), rel=1e-10, abs=1e-14
            )
            block = D.block(layer)
            assert_matrix(block, block_ref, route, f"{route} block {layer}")
            u = torch.ones(block.dim, dtype=torch.float64)
            assert_close(block @ u, block_ref @ u, what=f"{route} block matvec {layer}")


def test_f_hat_form_of_d(case):
    """(F3): D = (1/N²) ⟨∂_r f̂, ∂_s f̂⟩ with f̂ the differences f_i − f_j over pairs i < j."""
    G, D_ref = reference(case)
    n = len(G)
    diffs = torch.stack([G[i] - G[j] for i, j in itertools.combinations(range(n), 2)])
    assert_close(diffs.T @ diffs / n**2, D_ref, what="f-hat form")


def test_zero_when_all_samples_identical():
    case = make_case("mlp-relu")
    x, y = case.x[:1].repeat(6, 1), case.y[:1].repeat(6)
    for route in ("capture", "generic"):
        D = DiffusionMatrix(case.model, case.loss, (x, y), route=route)
        assert D.rank() == 0
        assert D.dense().abs().max() < 1e-14
        assert D.trace() < 1e-14
        assert D.effective_rank() < 1.5 or D.eigvalsh()[0] < 1e-14


def test_effective_rank_between_one_and_rank():
    case = make_case("mlp-relu")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    assert 1.0 <= D.effective_rank() <= D.rank()


def test_data_loader_streams_like_a_batch():
    case = make_case("mlp-tanh")
    dataset = torch.utils.data.TensorDataset(case.x, case.y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    v = torch.randn(sum(p.numel() for p in case.model.parameters()), dtype=torch.float64)
    batch = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    for route, cache in (("capture", True), ("capture", False), ("generic", "auto")):
        streamed = DiffusionMatrix(
            case.model, case.loss, loader, route=route, cache=cache, chunk_size=3
        )
        assert streamed.n == len(case.x)
        assert_close(streamed @ v, batch @ v, what=f"{route} streamed D @ v")
        assert_close(streamed.gram(), batch.gram(), what=f"{route} streamed gram")


def test_shuffled_loader_is_refused():
    case = make_case("mlp-tanh")
    dataset = torch.utils.data.TensorDataset(case.x, case.y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    torch.manual_seed(0)
    D = DiffusionMatrix(case.model, case.loss, loader, route="generic")
    with pytest.raises(SgdgeomError, match="different data on another pass"):
        for _ in range(5):
            D @ torch.zeros(D.space.dim, dtype=torch.float64)


def test_batchnorm_and_dropout_in_train_mode_are_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2))
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    for route in ("auto", "capture", "generic"):
        with pytest.raises(
            UnsupportedModelError, match=r"BatchNorm layer '1' normalises with batch statistics"
        ):
            DiffusionMatrix(model, "cross_entropy", data, route=route)
    model[1].eval()
    with pytest.raises(UnsupportedModelError, match="Dropout layer '2' is in train mode"):
        DiffusionMatrix(model, "cross_entropy", data)
    model.eval()
    D = DiffusionMatrix(model.double(), "cross_entropy", (data[0].double(), data[1]))
    assert D.route == "capture"  # BatchNorm's affine parameters have a rule in eval mode
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), data[0].double(), data[1])
    assert_close(D.dense(), dense_diffusion(G), what="eval-mode BatchNorm")
    untracked = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(UnsupportedModelError, match="no running statistics"):
        DiffusionMatrix(untracked, "cross_entropy", data)


def test_dropout_with_zero_probability_is_accepted_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 2)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), *data)
    D = DiffusionMatrix(model, "cross_entropy", data)
    assert_close(D.dense(), dense_diffusion(G), what="p = 0 dropout")


def test_dense_refuses_large_models_and_bad_arguments():
    case = make_case("mlp-relu")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    with pytest.raises(ValueError, match="use D @ v, eigsh"):
        D.dense(limit=10)
    with pytest.raises(ValueError, match="k must be in"):
        D.eigsh(0)
    with pytest.raises(ValueError, match="data is required"):
        DiffusionMatrix(case.model, case.loss)
    with pytest.raises(ValueError, match="route must be one of auto, capture, generic"):
        DiffusionMatrix(case.model, case.loss, (case.x, case.y), route="magic")
    with pytest.raises(ValueError, match="unknown loss"):
        DiffusionMatrix(case.model, "hinge", (case.x, case.y))


@pytest.mark.parametrize(
    "spectrum",
    [
        [3.0, 2.0, 1.0, 0.5, 0.0],  # well separated
        [1.0, 1.0 - 1e-6, 0.3, 0.1],  # a near-double top eigenvalue
        [2.0] + [0.0] * 40,  # rank one: Lanczos stops at once (invariant subspace)
        list(torch.logspace(0, -3, 200).tolist()),  # many steps
        [0.0] * 6,  # D = 0
        [5.0],
    ],
)
def test_lanczos_top_eigenvalue_equals_the_spectrum(spectrum):
    values = torch.tensor(spectrum, dtype=torch.float64)
    n = len(values)
    basis, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    )
    K = basis @ torch.diag(values) @ basis.T
    assert top_eigenvalue(K, tol=1e-10) == pytest.approx(float(values.max()), rel=1e-9, abs=1e-12)


def test_lambda_max_by_lanczos_on_a_real_gram_matrix(case):
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    estimate = D.lambda_max(tol=1e-10)
    assert "_eigvalsh" not in D.__dict__  # no full spectrum was computed
    assert estimate == pytest.approx(D.lambda_max(), rel=1e-10)


def test_gram_matvec_and_matrix_free_lambda_max_equal_the_gram_matrix(case):
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    free = D.lambda_max(tol=1e-10, matrix_free=True)
    assert "_gram" not in D.__dict__ and 1 <= D.lanczos_steps <= D.n
    w = torch.randn(D.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(D.gram_matvec(w), D.gram() @ w, rtol=1e-12, atol=1e-14)
    assert free == pytest.approx(D.lambda_max(), rel=1e-9)


def test_conjugate_gradients_solve_and_refuse_what_they_cannot():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=gen))
    A = basis @ torch.diag(torch.linspace(1.0, 1.9, 30, dtype=torch.float64)) @ basis.T
    b = torch.randn(30, dtype=torch.float64, generator=gen)
    x, steps = conjugate_gradients(lambda p: A @ p, b, tol=1e-13)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-13)
    assert 5 <= steps <= 25  # κ < 2: the error falls about 6-fold per step
    assert conjugate_gradients(lambda p: A @ p, torch.zeros(30, dtype=torch.float64), 1e-13)[1] == 0
    spread = basis @ torch.diag(torch.logspace(0, 8, 30, dtype=torch.float64)) @ basis.T
    with pytest.raises(ValueError, match="conjugate gradients reached"):
        conjugate_gradients(lambda p: spread @ p, b, tol=1e-13, max_steps=5)


def _cost_cases():
    conv = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3))
    sequence = nn.Sequential(nn.Linear(4, 50), nn.Tanh(), nn.Flatten(), nn.Linear(500, 3))
    gen = torch.Generator().manual_seed(0)
    return {
        "mlp": (make_case("mlp-relu").model, make_case("mlp-relu").x),
        "conv": (conv.double(), torch.randn(5, 16, 6, 6, generator=gen, dtype=torch.float64)),
        "sequence": (sequence.double(), torch.randn(6, 10, 4, generator=gen, dtype=torch.float64)),
        "rows": (make_case("small-cnn").model, make_case("small-cnn").x),
    }


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("mlp", {"LinearCall"}),
        ("conv", {"ConvCall", "LinearCall"}),
        ("sequence", {"LinearCall"}),
        ("rows", {"RowsCall", "LinearCall"}),
    ],
)
def test_costs_count_the_multiply_adds(name, kinds, monkeypatch):
    """A Linear's product is b·T·in·out, its ghost Gram b²T²(in + out) (else the rows':
    b·T·in·out + b²·numel); a Conv's product is b·H'W'·numel(weight), its Gram the rows';
    stored rows cost b·numel and b²·numel."""
    if name != "rows":  # calls without a ghost Gram are kept only where rows would not fit
        monkeypatch.setattr(capture, "ROWS_LIMIT", 0)
    model, x = _cost_cases()[name]
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    products = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture").products
    chunk, b = next(products._chunks()), len(x)
    expected, seen = [0.0, 0.0], set()
    for layer, calls in zip(products.layers, chunk.calls, strict=True):
        numel = sum(p.numel() for _, p in layer.module.named_parameters() if p.requires_grad)
        for call in calls:
            seen.add(type(call).__name__)
            if isinstance(call, LinearCall):
                t, fan_in, fan_out = (
                    call.inputs.shape[1],
                    layer.module.in_features,
                    (layer.module.out_features),
                )
                p = b * t * fan_in * fan_out
                ghost = t == 1 or t * t * (fan_in + fan_out) <= fan_in * fan_out
                g = b * b * t * t * (fan_in + fan_out) if ghost else p + b * b * numel
            elif isinstance(call, ConvCall):
                p = b * call.grads[0, 0].numel() * layer.module.weight.numel()
                g = p + b * b * numel
            else:
                p, g = b * numel, b * b * numel
            expected[0] += p
            expected[1] += g
    assert seen == kinds
    assert products.costs() == (expected[0], expected[1])


def test_lanczos_refuses_a_gram_matrix_that_is_not_finite():
    K = torch.eye(3, dtype=torch.float64)
    K[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        top_eigenvalue(K)


def _divergence_models():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    ).double()
    regression = nn.Linear(3, 1).double()
    return {
        "mlp": (mlp, "cross_entropy", torch.randn(7, 3), torch.randint(0, 3, (7,))),
        "cnn": (cnn, "cross_entropy", torch.randn(6, 1, 3, 3), torch.randint(0, 3, (6,))),
        "linear-regression": (regression, "mse", torch.randn(7, 3), torch.randn(7, 1)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "linear-regression"])
def test_divergence_exact_and_hutchinson_against_autograd_of_dense_d(name):
    model, loss, x, y = _divergence_models()[name]
    x, y = x.double(), (y.double() if y.is_floating_point() else y)
    reference = dense_divergence(model, per_sample_loss(loss), x, y)
    D = DiffusionMatrix(model, loss, (x, y), route="generic")
    exact = D.divergence()
    assert exact.stderr is None
    assert_close(exact.value, reference, rtol=1e-10, atol=1e-12, what="∇·D exact")
    assert float(reference.abs().max()) > 1e-3  # a divergence that is not zero
    estimate = D.divergence(probes=400, seed=1)
    assert estimate.probes == 400 and estimate.stderr.shape == reference.shape
    z = (estimate.value - reference).abs() / estimate.stderr.clamp_min(1e-15)
    assert float(z.max()) < 4.0, z


def test_divergence_needs_second_derivatives():
    model, loss, x, y = _divergence_models()["mlp"]
    D = DiffusionMatrix(model, loss, (x.double(), y), route="capture")
    with pytest.raises(UnsupportedModelError, match="route='generic'"):
        D.divergence()
    with pytest.raises(InputError, match="probes must be None"):
        DiffusionMatrix(model, loss, (x.double(), y), route="generic").divergence(probes=1)


@pytest.mark.parametrize("name", ["partly-frozen", "tied-autoencoder", "reused-linear",
                                  "functional-loss"])  # fmt: skip
def test_divergence_on_unusual_models_against_autograd_of_dense_d(name):
    case = make_case(name)
    reference = dense_divergence(case.model, per_sample_loss(case.loss), case.x, case.y)
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route="generic")
    assert_close(D.divergence().value, reference, rtol=1e-9, atol=1e-12, what=f"∇·D {name}")


SHARDED = [
    ("mlp-relu", "capture"),
    ("small-cnn", "capture"),
    ("partly-frozen", "capture"),
    ("mlp-tanh", "generic"),
    ("tied-autoencoder", "generic"),
]


def _measures(D):
    V = torch.randn(D.space.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return {
        "spectrum": D.eigvalsh(),
        "top": D.eigsh(3).values,
        "product": D @ V,
        "traces": torch.tensor(list(D.param_traces().values()), dtype=torch.float64),
        "dense": D.dense(),
    }


def _sharded_worker(rank, world, results):
    """Each rank builds D on its own, uneven shard (4 samples on rank 0, the rest on 1)."""
    out = {}
    for name, route in SHARDED:
        case = make_case(name)
        cut = [0, 4, len(case.x)][rank : rank + 2]
        D = DiffusionMatrix(
            case.model,
            case.loss,
            (case.x[cut[0] : cut[1]], case.y[cut[0] : cut[1]]),
            route=route,
            chunk_size=3,
            distributed=True,
        )
        out[name] = _measures(D)
        assert D.n == len(case.x) and D.route == route
        # processes synchronise on every pass: the fewest passes
        assert D.preferred_method() == "block-lanczos"
    if rank == 0:
        torch.save(out, results)


def test_two_gloo_processes_give_the_one_process_d(tmp_path):
    from tests.distributed import spawn

    results = tmp_path / "sharded.pt"
    spawn(_sharded_worker, tmp_path, str(results))
    got = torch.load(results, weights_only=True)
    for name, route in SHARDED:
        case = make_case(name)
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), route=route, chunk_size=3)
        for key, value in _measures(D).items():
            assert_close(got[name][key], value, rtol=1e-12, atol=1e-14, what=f"{name} {key}")


def test_distributed_needs_a_process_group():
    case = make_case("mlp-relu")
    with pytest.raises(InputError, match="process group"):
        DiffusionMatrix(case.model, case.loss, (case.x, case.y), distributed=True)
