r"""Where does SGD settle? Its stationary density on the two-parameter problems against the
candidates of Fioresi et al. (F11–F12) and Chaudhari & Soatto.

SGD with per-sample noise (minibatches of ``b`` drawn with replacement, learning rate η) is
run by many independent walkers from the minimum of f until they forget it; their iterates
are then binned on a grid around the minimum and compared with

- the Gibbs density :math:`e^{-\beta f}`, :math:`\beta^{-1} = \eta / (2b)`;
- :math:`e^{-\beta\Phi}` with :math:`\nabla\Phi = \nabla_D f = g^{-1}\nabla f` (F11), the
  steady state that (F12) with :math:`j = 0` predicts, where such a Φ exists: only where the
  curl of :math:`\nabla_D f` vanishes (:func:`~sgdgeom.geometry.curl`);
- the stationary density of the Chaudhari–Soatto SDE
  :math:`dx = -\nabla f\,dt + \sqrt{2\beta^{-1}D}\,dW`: exact (a Gaussian whose covariance
  solves the Lyapunov equation :math:`A\Sigma + \Sigma A = 2\beta^{-1}D`) where f is
  quadratic and D constant, else the histogram of Euler–Maruyama walkers.

Each comparison is the total variation distance between the binned densities, with a
bootstrap error bar over walkers; the distance between two halves of the SGD walkers is the
sampling floor. The experiment also records (F12)'s instruments: the divergence term
:math:`\|(\varepsilon/\beta)\nabla\cdot D\|` beside :math:`\|\nabla f\|` at the walkers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon
from sgdgeom.experiments.config import load_yaml_as
from sgdgeom.experiments.kinds import ExperimentKind, into_out, register_kind
from sgdgeom.experiments.plane import PlaneProblem, _argmin, identity_loss, make_problem
from sgdgeom.files import atomic_write_bytes, save_figure
from sgdgeom.geometry import (
    chaudhari_soatto_sde,
    curl,
    per_sample_gradient_function,
    set_parameters,
    sgd_ensemble,
)

__all__ = [
    "KIND",
    "SteadyStateConfig",
    "load_steady_state_config",
    "plot_steady_state",
    "run_steady_state",
]

SPLITS = 20  # random splits of the walkers behind the sampling floor
CURL_FREE = 1e-10  # relative curl below which ∇_D f counts as a gradient (rounding level)
GIBBS = "gibbs exp(-beta f)"
POTENTIAL = "exp(-beta Phi), grad Phi = grad_D f"
LYAPUNOV = "SDE stationary (Lyapunov)"
SDE_WALKERS = "SDE walkers (Euler–Maruyama)"
COLOURS = {
    GIBBS: "tab:blue",
    POTENTIAL: "tab:red",
    LYAPUNOV: "tab:green",
    SDE_WALKERS: "tab:orange",
}


class SteadyStateConfig(BaseModel):
    """A steady-state experiment on one two-parameter problem (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    seed: int = Field(0, ge=0)
    problem: Literal["quadratic", "aligned", "rosenbrock"] = "aligned"
    n: int = Field(64, ge=4)
    lr: float = Field(0.02, gt=0)
    batch_size: int = Field(4, ge=1)
    walkers: int = Field(2000, ge=20)
    t_burn: float = Field(8.0, gt=0)
    t_sample: float = Field(8.0, gt=0)
    snapshots: int = Field(16, ge=1)
    sde_substeps: int = Field(2, ge=1)
    eps_fraction: float = Field(0.5, gt=0, lt=1)
    bins: int = Field(24, ge=4)
    window: float = Field(4.5, gt=0)
    bootstrap: int = Field(200, ge=10)

    @model_validator(mode="after")
    def _bounded(self) -> SteadyStateConfig:
        """The work and memory this config asks for, refused up front beyond a machine's
        reach (:data:`STEADY_STATE_LIMITS`), with the estimate."""
        every = max(1, round(self.t_sample / self.lr / self.snapshots))
        steps = (round(self.t_burn / self.lr) + every * self.snapshots) * (1 + self.sde_substeps)
        walker_steps = steps * self.walkers
        memory = 8 * (
            2 * self.walkers * (self.snapshots + 1) * 2  # both ensembles' samples
            + 2 * self.walkers * self.bins**2  # the per-walker histograms
        )
        limits = STEADY_STATE_LIMITS
        if walker_steps > limits["walker_steps"]:
            raise ValueError(
                f"{self.walkers:,} walkers x {steps:,} steps (SGD and SDE, from t_burn, "
                f"t_sample, lr and sde_substeps) = {walker_steps:.2e} walker-steps, more than "
                f"{limits['walker_steps']:.0e}: fewer walkers, a shorter t_burn or a larger lr"
            )
        if memory > limits["bytes"]:
            raise ValueError(
                f"the walkers' samples and histograms need {memory / 2**30:.1f} GiB (walkers, "
                f"snapshots, bins²), more than {limits['bytes'] / 2**30:.0f} GiB: fewer walkers "
                f"or bins"
            )
        return self


STEADY_STATE_LIMITS = {"walker_steps": 1e11, "bytes": 8 * 2**30}
"""The most walker-steps and bytes a steady-state config may ask for (the defaults take
about 2·10⁷ and a few MiB)."""


def load_steady_state_config(path: str | Path) -> SteadyStateConfig:
    """Read and validate a steady-state experiment config (YAML)."""
    return load_yaml_as(SteadyStateConfig, path)


# --------------------------------------------------------------------------- fields


class _PlaneFields:
    """f, ∇f, D and ∇_D f of a plane problem at many points at once (``(P, 2)``)."""

    def __init__(self, model: PlaneProblem, data: tuple[Tensor, Tensor], eps: float) -> None:
        self.model, self.data, self.eps = model, data, eps
        self._gradients = vmap(per_sample_gradient_function(model, identity_loss), (0, None, None))

    def loss(self, points: Tensor) -> Tensor:
        constants = self.data[0]
        return vmap(lambda p: functional_call(self.model, {"x": p}, (constants,)).mean())(points)

    def moments(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``∇f`` ``(P, 2)`` and ``D`` ``(P, 2, 2)``."""
        G = self._gradients(points, *self.data)
        mean = G.mean(1)
        centred = G - mean[:, None]
        return mean, centred.transpose(1, 2) @ centred / G.shape[1]

    def metric_gradient(self, points: Tensor) -> Tensor:
        """``∇_D f = (I + εD)⁻¹ ∇f`` (F10), the 2 x 2 system at each point."""
        gradient, D = self.moments(points)
        g = torch.eye(2, dtype=D.dtype) + self.eps * D
        return torch.linalg.solve(g, gradient[..., None])[..., 0]

    def potential(self, points: Tensor, origin: Tensor, nodes: int = 16) -> Tensor:
        """``Φ(x) − Φ(origin) = ∫₀¹ ∇_D f(origin + s(x − origin))·(x − origin) ds`` by
        Gauss–Legendre; path-independent only where ∇_D f is curl-free."""
        roots, weights = np.polynomial.legendre.leggauss(nodes)  # on [-1, 1]
        s, w = torch.as_tensor((roots + 1) / 2), torch.as_tensor(weights / 2)
        offset = points - origin
        along = origin + s[:, None, None] * offset[None]  # (nodes, P, 2)
        field = self.metric_gradient(along.reshape(-1, 2)).reshape(along.shape)
        return torch.einsum("k,kpd,pd->p", w, field, offset)


# --------------------------------------------------------------------------- histograms


class _Grid:
    """A ``bins x bins`` grid around ``centre``, ``half`` wide on each axis."""

    def __init__(self, centre: np.ndarray, half: np.ndarray, bins: int) -> None:
        self.edges = [
            np.linspace(c - h, c + h, bins + 1) for c, h in zip(centre, half, strict=True)
        ]
        self.bins = bins

    def index(self, points: np.ndarray) -> np.ndarray:
        """The flat bin of each point, −1 outside the grid."""
        cols = [
            np.searchsorted(e, points[..., k], side="right") - 1 for k, e in enumerate(self.edges)
        ]
        inside = np.all([(c >= 0) & (c < self.bins) for c in cols], axis=0)
        return np.where(inside, cols[0] * self.bins + cols[1], -1)

    def counts(self, samples: np.ndarray) -> np.ndarray:
        """``(walkers, bins²)`` counts of each walker's samples (``(walkers, K, 2)``)."""
        idx = self.index(samples)
        out = np.zeros((len(samples), self.bins**2))
        for w, row in enumerate(idx):
            out[w] = np.bincount(row[row >= 0], minlength=self.bins**2)
        return out

    def sub_points(self, per_bin: int = 3) -> np.ndarray:
        """``(bins², per_bin², 2)`` points spread inside each bin (midpoint rule)."""
        centres = []
        for e in self.edges:
            width = e[1] - e[0]
            offsets = (np.arange(per_bin) + 0.5) / per_bin * width
            centres.append(e[:-1, None] + offsets[None])  # (bins, per_bin)
        a, b = centres
        ga = np.broadcast_to(a[:, None, :, None], (self.bins, self.bins, per_bin, per_bin))
        gb = np.broadcast_to(b[None, :, None, :], (self.bins, self.bins, per_bin, per_bin))
        return np.stack([ga, gb], -1).reshape(self.bins**2, per_bin**2, 2)

    def binned(self, log_density: np.ndarray) -> np.ndarray:
        """Bin probabilities from a log density at :meth:`sub_points` (``(bins², m)``),
        normalised over the grid."""
        weights = np.exp(log_density - log_density.max()).mean(1)
        return weights / weights.sum()


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(-1)


def _halves_tv(counts: np.ndarray, rng: np.random.Generator) -> float:
    """TV between the histograms of two random halves of the walkers."""
    order = rng.permutation(len(counts))
    first, second = counts[order[::2]], counts[order[1::2]]
    return float(_tv(first.sum(0) / first.sum(), second.sum(0) / second.sum()))


def _bootstrap_histograms(counts: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(draws, bins²)`` normalised histograms of walkers resampled with replacement."""
    weights = rng.multinomial(len(counts), np.full(len(counts), 1 / len(counts)), size=draws)
    totals = weights @ counts
    return totals / totals.sum(1, keepdims=True)


def _distance(
    counts: np.ndarray, reference: np.ndarray, draws: int, rng: np.random.Generator
) -> dict[str, float]:
    """TV between the walkers' histogram (``counts``, ``(walkers, bins²)``) and a reference:
    a density's bin probabilities ``(bins²,)``, or another sample's counts ``(walkers',
    bins²)``, resampled too. The error bar is the bootstrap standard deviation."""
    hist = counts.sum(0) / counts.sum()
    boot = _bootstrap_histograms(counts, draws, rng)
    if reference.ndim == 2:
        target = reference.sum(0) / reference.sum()
        other = _bootstrap_histograms(reference, draws, rng)
    else:
        target = other = reference
    return {"tv": float(_tv(hist, target)), "stderr": float(_tv(boot, other).std())}


def _gaussian_log_density(points: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    centred = points - mean
    return -0.5 * np.einsum("...i,ij,...j->...", centred, np.linalg.inv(cov), centred)


def _weighted_moments(points: np.ndarray, weights: np.ndarray) -> dict[str, list]:
    """Mean and covariance of a density given by bin probabilities at bin points."""
    mean = weights @ points
    centred = points - mean
    return {"mean": mean.tolist(), "cov": (centred.T * weights @ centred).tolist()}


# --------------------------------------------------------------------------- experiment


def _walkers(
    config: SteadyStateConfig, model: PlaneProblem, data: tuple[Tensor, Tensor], x_min: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """SGD's and the SDE's walkers after the burn-in, ``(walkers, snapshots + 1, 2)`` each,
    from the minimum of f; the SDE takes ``sde_substeps`` steps per SGD step."""
    every = max(1, round(config.t_sample / config.lr / config.snapshots))
    steps = round(config.t_burn / config.lr) + every * config.snapshots
    sgd = sgd_ensemble(
        model, identity_loss, data, x_min, lr=config.lr, batch_size=config.batch_size,
        steps=steps, runs=config.walkers, every=every,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    sde = chaudhari_soatto_sde(
        model, identity_loss, data, x_min, lr=config.lr, batch_size=config.batch_size,
        t_end=steps * config.lr, dt=config.lr / config.sde_substeps, paths=config.walkers,
        every=every * config.sde_substeps,
        generator=torch.Generator().manual_seed(config.seed + 1),
    )  # fmt: skip
    after = config.t_burn - 1e-12
    return sgd["iterates"][:, sgd["t"] >= after], sde["iterates"][:, sde["t"] >= after]


def _largest_relative_curl(
    model: PlaneProblem, data: tuple[Tensor, Tensor], eps: float, points: Tensor
) -> float:
    """The exact curl of ∇_D f relative to its Jacobian (:func:`~sgdgeom.geometry.curl`),
    the largest over ``points``."""
    values = []
    for p in points:
        set_parameters(model, p)
        values.append(float(curl(model, identity_loss, data, eps).relative[0]))
    return max(values)


def _lyapunov(
    fields: _PlaneFields, x_min: Tensor, beta: float, config: SteadyStateConfig
) -> dict[str, np.ndarray]:
    """For f quadratic and D constant (the SDE is Ornstein–Uhlenbeck), the SDE's stationary
    covariance (``AΣ + ΣA = 2β⁻¹D``) and SGD's (``Σ = (I − ηA)Σ(I − ηA) + η²D/b``)."""
    from scipy.linalg import solve_continuous_lyapunov, solve_discrete_lyapunov

    hessian = torch.autograd.functional.hessian(lambda p: fields.loss(p[None])[0], x_min).numpy()
    D = fields.moments(x_min[None])[1][0].numpy()
    step = np.eye(2) - config.lr * hessian
    return {
        "sde_continuous": solve_continuous_lyapunov(hessian, 2 / beta * D),
        "sgd_discrete": solve_discrete_lyapunov(step, config.lr**2 * D / config.batch_size),
    }


def _f12_instruments(
    model: PlaneProblem, data: tuple[Tensor, Tensor], eps: float, beta: float, points: np.ndarray
) -> dict[str, float]:
    """(F12)'s divergence term ``‖(ε/β)∇·D‖`` beside ``‖∇f‖`` at ``points`` (exact ∇·D)."""
    divergence, gradient = [], []
    for p in points:
        set_parameters(model, torch.as_tensor(p))
        matrix = DiffusionMatrix(model, identity_loss, data, route="generic", chunk_size=None)
        divergence.append(eps / beta * float(matrix.divergence().value.norm()))
        gradient.append(float(matrix.mean_gradient().norm()))
    return {
        "divergence_term_mean": float(np.mean(divergence)),
        "gradient_mean": float(np.mean(gradient)),
        "ratio_median": float(np.median(np.array(divergence) / np.array(gradient))),
    }


def run_steady_state(
    config: SteadyStateConfig, out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Run the experiment; write ``steady-state.json`` and ``steady-state.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model, data = make_problem(config.problem, config.n, config.seed)
    minimum = _argmin(model, data, model.x.detach().clone())
    x_min = torch.as_tensor(minimum)
    beta = 2 * config.batch_size / config.lr
    stages = tqdm(total=3, desc="steady state", disable=not progress)
    sgd_samples, sde_samples = _walkers(config, model, data, x_min)
    stages.update()

    flat = sgd_samples.reshape(-1, 2)
    grid = _Grid(flat.mean(0), config.window * flat.std(0), config.bins)
    points = torch.as_tensor(grid.sub_points())
    coarse = torch.as_tensor(
        np.stack(np.meshgrid(*[e[::4] for e in grid.edges]), -1).reshape(-1, 2)
    )
    fields = _PlaneFields(model, data, eps=0.0)
    lam_max = float(torch.linalg.eigvalsh(fields.moments(coarse)[1])[:, -1].max())
    eps = fields.eps = Epsilon.auto(config.eps_fraction).resolve(lam_max)
    curl_max = _largest_relative_curl(model, data, eps, coarse[:: max(1, len(coarse) // 16)])
    potential_exists = curl_max < CURL_FREE
    f_values = fields.loss(points.reshape(-1, 2)).reshape(points.shape[:2]).numpy()
    candidates = {GIBBS: grid.binned(-beta * f_values)}
    if potential_exists:
        phi = fields.potential(points.reshape(-1, 2), x_min).reshape(points.shape[:2]).numpy()
        candidates[POTENTIAL] = grid.binned(-beta * phi)
    lyapunov = None
    if config.problem != "rosenbrock":
        lyapunov = _lyapunov(fields, x_min, beta, config)
        candidates[LYAPUNOV] = grid.binned(
            _gaussian_log_density(points.numpy(), minimum, lyapunov["sde_continuous"])
        )
    stages.update()

    counts = grid.counts(sgd_samples)
    sde_counts = grid.counts(sde_samples)
    distances = {
        name: _distance(counts, q, config.bootstrap, rng) for name, q in candidates.items()
    }
    distances[SDE_WALKERS] = _distance(counts, sde_counts, config.bootstrap, rng)
    # two halves of the walkers: TV ≈ 2c√(bins/n) against c√(bins/n) for all n samples
    # against their own density, and c√(2 bins/n) for two samples of n (multinomial noise);
    # averaged over SPLITS random splits
    halves_tv = float(np.mean([_halves_tv(counts, rng) for _ in range(SPLITS)]))
    probe = flat[rng.choice(len(flat), size=min(32, len(flat)), replace=False)]
    f12 = _f12_instruments(model, data, eps, beta, probe)
    set_parameters(model, x_min)
    stages.update()
    stages.close()

    bin_points = points.numpy().mean(1)
    result = {
        "config": config.model_dump(mode="json"),
        "beta": beta,
        "eps": eps,
        "lambda_max": lam_max,
        "minimum_of_f": minimum.tolist(),
        "grid": {"edges": [e.tolist() for e in grid.edges]},
        "sgd": {
            "samples": int(counts.sum()),
            "inside_grid": float(counts.sum() / flat.shape[0]),
            "mean": flat.mean(0).tolist(),
            "cov": np.cov(flat.T).tolist(),
            "histogram": (counts.sum(0) / counts.sum()).tolist(),
        },
        "sde_walkers": {
            "dt": config.lr / config.sde_substeps,
            "mean": sde_samples.reshape(-1, 2).mean(0).tolist(),
            "cov": np.cov(sde_samples.reshape(-1, 2).T).tolist(),
            "histogram": (sde_counts.sum(0) / sde_counts.sum()).tolist(),
        },
        "candidates": {
            name: {"histogram": q.tolist(), **_weighted_moments(bin_points, q)}
            for name, q in candidates.items()
        },
        "distances": distances,
        "sampling_floor": {
            "two_halves": halves_tv,
            "sample_vs_density": halves_tv / 2,
            "sample_vs_sample": halves_tv / 2**0.5,
        },
        "curl_relative_max": curl_max,
        "potential_exists": potential_exists,
        "lyapunov": {k: v.tolist() for k, v in lyapunov.items()} if lyapunov else None,
        "f12": f12,
    }
    path = out / "steady-state.json"
    atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    plot_steady_state(path, out / "steady-state.png")
    return result


def plot_steady_state(json_path: str | Path, png: str | Path) -> Path:
    """The SGD histogram with the candidates' contours, both marginals, and the distances
    with their error bars, from the JSON alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(json_path).read_text())
    edges = [np.array(e) for e in r["grid"]["edges"]]
    bins = len(edges[0]) - 1
    centres = [(e[1:] + e[:-1]) / 2 for e in edges]
    sgd = np.array(r["sgd"]["histogram"]).reshape(bins, bins)
    densities = {
        name: np.array(c["histogram"]).reshape(bins, bins) for name, c in r["candidates"].items()
    }
    densities[SDE_WALKERS] = np.array(r["sde_walkers"]["histogram"]).reshape(bins, bins)
    colours = {name: COLOURS[name] for name in densities}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    axes[0].pcolormesh(edges[0], edges[1], sgd.T, cmap="Greys")
    for name, q in densities.items():
        # the density levels that enclose 90% and 50% of the mass
        ordered = np.sort(q.ravel())[::-1]
        cumulative = np.cumsum(ordered)
        levels = np.unique([ordered[np.searchsorted(cumulative, m)] for m in (0.9, 0.5)])
        axes[0].contour(centres[0], centres[1], q.T, levels=levels, colors=colours[name])
        axes[0].plot([], [], color=colours[name], label=name)
    axes[0].set_title(
        f"{r['config']['problem']}: SGD iterates (grey); 50% and 90% regions", fontsize=10
    )
    axes[0].legend(fontsize=7)
    for axis, ax in ((0, axes[1]), (1, axes[2])):
        width = edges[axis][1] - edges[axis][0]
        ax.step(centres[axis], sgd.sum(1 - axis) / width, where="mid", color="k", label="SGD")
        for name, q in densities.items():
            ax.plot(centres[axis], q.sum(1 - axis) / width, color=colours[name], label=name)
        ax.set_xlabel(f"x{axis + 1}")
        ax.set_title(f"marginal of x{axis + 1}")
    axes[1].legend(fontsize=7)
    names = list(r["distances"])
    values = [r["distances"][n]["tv"] for n in names]
    errors = [r["distances"][n]["stderr"] for n in names]
    axes[3].barh(range(len(names)), values, xerr=errors, color=[colours[n] for n in names])
    floor = r["sampling_floor"]
    axes[3].axvline(floor["sample_vs_density"], color="k", ls=":", label="floor: against a density")
    axes[3].axvline(floor["sample_vs_sample"], color="k", ls="--", label="floor: two samples")
    axes[3].set_yticks(range(len(names)), names, fontsize=7)
    axes[3].set_xlabel("total variation distance to the SGD histogram")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    plt.close(fig)
    return Path(png)


def _summary(result: dict[str, Any]) -> str:
    lines = [f"{'density':<40} {'TV to the SGD histogram':>26}"]
    for name, d in result["distances"].items():
        lines.append(f"{name:<40} {d['tv']:>16.4f} ± {d['stderr']:.4f}")
    floor = result["sampling_floor"]
    lines.append(
        f"sampling floor: {floor['sample_vs_density']:.4f} against a density, "
        f"{floor['sample_vs_sample']:.4f} between two samples"
    )
    if not result["potential_exists"]:
        lines.append(
            f"no Φ with ∇Φ = ∇_D f: the curl of ∇_D f reaches "
            f"{result['curl_relative_max']:.3g} of its derivatives"
        )
    return "\n".join(lines)


KIND = register_kind(
    ExperimentKind(
        name="steady-state",
        help="Where SGD settles on a two-parameter problem, against exp(−βf), exp(−βΦ) (F11) "
        "and the Chaudhari–Soatto SDE: total variation distances with error bars.",
        config=SteadyStateConfig,
        run=into_out(run_steady_state),
        summary=_summary,
        plots=lambda out: [plot_steady_state(out / "steady-state.json", out / "steady-state.png")],
    )
)
