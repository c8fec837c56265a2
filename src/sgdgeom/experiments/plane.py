"""Two-parameter problems with anisotropic per-sample noise: the geometry of Fioresi et al.
where it can be drawn.

``x ∈ R²`` and per-sample losses ``f_i(x)``:

- ``quadratic``: ``f_i = ½ (x − ξ_i)ᵀ A (x − ξ_i)`` with ``A = diag(1, 4)`` and centres
  ``ξ_i`` spread anisotropically (third derivatives zero: the (F9) assumption holds);
- ``aligned``: the same with centres spread along the axes, so that ``D`` commutes with
  ``A``: the one problem here whose metric gradient ``∇_D f`` is a gradient (F11's Φ exists);
- ``rosenbrock``: ``f_i = (a_i − x₁)² + 5 (x₂ − x₁² + b_i)²`` with noisy ``a_i, b_i``.

The experiment draws the loss contours, the metric ellipses of ``g(x) = I + εD(x)`` (the
unit circle of g, ``{v: vᵀ g v = r²}``), the fields ``−∇f`` and ``−∇_D f``, and the GD,
SGD-mean, metric-flow and geodesic trajectories. For Chaudhari and Soatto it measures, at
every grid point, the exact curl of ``∇_D f`` (a gradient field has none: F11's Φ exists
only where it vanishes) and (F12)'s ratio ``‖(ε/β)∇·D‖ / ‖∇f‖``, and where long SGD runs
concentrate compared with the minimum of f, where the metric flow stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon
from sgdgeom.errors import InputError
from sgdgeom.files import atomic_write_bytes, save_figure
from sgdgeom.geometry import (
    curl,
    current,
    geodesic,
    gradient_flow,
    metric_flow,
    set_parameters,
    sgd_ensemble,
)
from sgdgeom.metric import DiffusionMetric

__all__ = ["PROBLEMS", "PlaneProblem", "make_problem", "run_plane"]

PROBLEMS = ("quadratic", "aligned", "rosenbrock")


class PlaneProblem(nn.Module):
    """A model whose only parameter is the point ``x ∈ R²``; its "output" for a batch of
    per-sample constants is the batch's per-sample losses (use the identity as the loss)."""

    def __init__(self, kind: str, start: tuple[float, float]) -> None:
        super().__init__()
        if kind not in PROBLEMS:
            raise InputError(f"unknown problem {kind!r}; choose {', '.join(PROBLEMS)}")
        self.kind = kind
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, constants: Tensor) -> Tensor:
        x1, x2 = self.x[0], self.x[1]
        if self.kind != "rosenbrock":
            diff = self.x - constants
            return 0.5 * (diff[:, 0] ** 2 + 4.0 * diff[:, 1] ** 2)
        a, b = constants[:, 0], constants[:, 1]
        return (a - x1) ** 2 + 5.0 * (x2 - x1**2 + b) ** 2


def identity_loss(output: Tensor, target: Tensor) -> Tensor:
    """The per-sample losses are the model's output."""
    return output


def make_problem(
    kind: str, n: int = 64, seed: int = 0
) -> tuple[PlaneProblem, tuple[Tensor, Tensor]]:
    """The model (at its start point) and its per-sample constants."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=g)
    if kind != "rosenbrock":
        # anisotropic noise: centres spread along a tilted direction, or along the axes
        rotation = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=torch.float64)
        if kind == "aligned":  # an exactly diagonal sample covariance: D commutes with A
            centred = noise - noise.mean(0)
            whitening = torch.linalg.cholesky(centred.T @ centred / n)
            noise = torch.linalg.solve_triangular(whitening, centred.T, upper=False).T
        constants = noise * torch.tensor([0.8, 0.15], dtype=torch.float64)
        if kind == "quadratic":
            constants = constants @ rotation.T
        start = (2.0, 1.5)
    else:
        constants = torch.stack([1 + 0.3 * noise[:, 0], 0.2 * noise[:, 1]], 1)
        start = (-1.0, 1.5)
    return PlaneProblem(kind, start), (constants, torch.zeros(n))


def _field(
    model: PlaneProblem, data: tuple[Tensor, Tensor], eps: float, point: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    set_parameters(model, torch.as_tensor(point))
    D = DiffusionMatrix(model, identity_loss, data, route="generic", chunk_size=None)
    metric = DiffusionMetric(D, eps)
    return (
        float(D.products.losses().mean()),
        D.mean_gradient().numpy(),
        metric.gradient().numpy(),
        D.dense().numpy(),
    )


def _instruments(
    model: PlaneProblem, data: tuple[Tensor, Tensor], eps: float, beta: float, point: np.ndarray
) -> tuple[float, float, float]:
    """At one point: the exact curl of ∇_D f, the same relative to its Jacobian, and the
    ratio ‖(ε/β)∇·D‖ / ‖∇f‖ of (F12) (:func:`~sgdgeom.geometry.current`)."""
    set_parameters(model, torch.as_tensor(point))
    rotation = curl(model, identity_loss, data, eps)
    D = DiffusionMatrix(model, identity_loss, data, route="generic", chunk_size=None)
    ratio = current(D, beta, eps).ratio
    return float(rotation.values[0]), float(rotation.relative[0]), ratio


def _argmin(model: PlaneProblem, data: tuple[Tensor, Tensor], x0: Tensor) -> np.ndarray:
    """The minimum of the mean loss f, by BFGS from ``x0``."""
    from scipy.optimize import minimize

    def value_and_grad(point: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient, _, _ = _field(model, data, 0.0, point)
        return value, gradient

    return minimize(value_and_grad, x0.numpy(), jac=True, method="BFGS", tol=1e-12).x


def run_plane(
    kind: str,
    out_dir: str | Path,
    *,
    eps_fraction: float = 0.5,
    n: int = 64,
    t_end: float = 3.0,
    lr: float = 0.02,
    batch_size: int = 4,
    runs: int = 64,
    grid: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one two-parameter problem; write ``plane-KIND.json`` and ``plane-KIND.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, data = make_problem(kind, n, seed)
    x0 = model.x.detach().clone()
    # one ε for the whole plane: a fraction of 1/max λ_max over the grid and the start
    quadratic = kind != "rosenbrock"
    xs = np.linspace(-2.5, 2.5, grid) if quadratic else np.linspace(-1.6, 1.8, grid)
    ys = np.linspace(-2.0, 2.0, grid) if quadratic else np.linspace(-0.6, 2.6, grid)
    points = [np.array([a, b]) for b in ys for a in xs] + [x0.numpy()]
    lam_max = max(float(np.linalg.eigvalsh(_field(model, data, 0.0, p)[3])[-1]) for p in points)
    eps = Epsilon.auto(eps_fraction).resolve(lam_max)
    fields = [_field(model, data, eps, p) for p in points[:-1]]
    t = np.linspace(0, t_end, 61)
    runs_ = {
        "gd": gradient_flow(model, identity_loss, data, x0, t),
        "metric-exact": metric_flow(model, identity_loss, data, x0, t, eps),
        "metric-weak": metric_flow(model, identity_loss, data, x0, t, eps, inverse="weak"),
        "geodesic-exact": geodesic(model, identity_loss, data, x0, t, eps),
    }
    ensemble = sgd_ensemble(
        model,
        identity_loss,
        data,
        x0,
        lr=lr,
        batch_size=batch_size,
        steps=round(t_end / lr),
        runs=runs,
        generator=torch.Generator().manual_seed(seed),
    )
    long_run = sgd_ensemble(
        model,
        identity_loss,
        data,
        x0,
        lr=lr,
        batch_size=batch_size,
        steps=round(10 * t_end / lr),
        runs=runs,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    # (F11)-(F12) on the grid: the exact curl ∂₁F₂ − ∂₂F₁ of F = ∇_D f, and the current's
    # divergence term against ∇f at SGD's temperature β = 2b/η
    beta = 2 * batch_size / lr
    instruments = [_instruments(model, data, eps, beta, p) for p in points[:-1]]
    curls = np.array([c for c, _, _ in instruments])
    minimum = _argmin(model, data, x0)
    final = long_run["iterates"][:, -1]
    sgd_mean_t = np.stack([np.interp(t, ensemble["t"], ensemble["mean"][:, j]) for j in (0, 1)], 1)
    result = {
        "kind": kind,
        "eps": eps,
        "eps_fraction": eps_fraction,
        "lambda_max_grid": lam_max,
        "grid": {
            "x": xs.tolist(),
            "y": ys.tolist(),
            "loss": [f[0] for f in fields],
            "grad": [f[1].tolist() for f in fields],
            "metric_grad": [f[2].tolist() for f in fields],
            "D": [f[3].tolist() for f in fields],
        },
        "t": t.tolist(),
        "trajectories": {k: v.x.tolist() for k, v in runs_.items()},
        "sgd_mean": sgd_mean_t.tolist(),
        "distance_to_sgd_mean": {
            k: float(np.linalg.norm(v.x - sgd_mean_t, axis=1).mean()) for k, v in runs_.items()
        },
        "geodesic_minus_metric_flow": float(
            np.linalg.norm(runs_["geodesic-exact"].x - runs_["metric-exact"].x, axis=1).max()
        ),
        "curl": curls.tolist(),
        "curl_max": float(np.abs(curls).max()),
        "curl_relative": float(max(r for _, r, _ in instruments)),
        "beta": beta,
        "current_ratio": [q for _, _, q in instruments],
        "long_run": {
            "steps": round(10 * t_end / lr),
            "mean": final.mean(0).tolist(),
            "std": final.std(0).tolist(),
            "minimum_of_f": minimum.tolist(),
            "mean_minus_minimum": float(np.linalg.norm(final.mean(0) - minimum)),
        },
        "long_run_points": final.tolist(),
    }
    path = out / f"plane-{kind}.json"
    atomic_write_bytes(path, json.dumps(result).encode())
    plot_plane(path, out / f"plane-{kind}.png")
    return result


def plot_plane(json_path: str | Path, png: str | Path) -> Path:
    """Contours, metric ellipses, the two fields and the trajectories, from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    r = json.loads(Path(json_path).read_text())
    xs, ys = np.array(r["grid"]["x"]), np.array(r["grid"]["y"])
    n = len(xs)
    loss = np.array(r["grid"]["loss"]).reshape(n, n)
    grad = np.array(r["grid"]["grad"]).reshape(n, n, 2)
    mgrad = np.array(r["grid"]["metric_grad"]).reshape(n, n, 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    X, Y = np.meshgrid(xs, ys)
    for ax in (left, right):
        ax.contour(X, Y, np.log(loss - loss.min() + 1e-3), levels=15, cmap="Greys", alpha=0.6)
    step = (xs[1] - xs[0]) * 0.4
    for (a, b), Dm in zip(((a, b) for b in ys for a in xs), r["grid"]["D"], strict=True):
        values, vectors = np.linalg.eigh(np.eye(2) + r["eps"] * np.array(Dm))
        widths = step / np.sqrt(values)  # the unit circle of g, scaled
        angle = np.degrees(np.arctan2(vectors[1, 0], vectors[0, 0]))
        left.add_patch(
            Ellipse(
                (a, b),
                2 * widths[0],
                2 * widths[1],
                angle=angle,
                fill=False,
                color="tab:purple",
                lw=0.7,
            )
        )
    right.quiver(X, Y, -grad[:, :, 0], -grad[:, :, 1], color="tab:blue", alpha=0.6, label="−∇f")
    right.quiver(X, Y, -mgrad[:, :, 0], -mgrad[:, :, 1], color="tab:red", alpha=0.6, label="−∇_D f")
    for name, traj in r["trajectories"].items():
        traj = np.array(traj)
        left.plot(traj[:, 0], traj[:, 1], lw=1.5, label=name)
    sgd = np.array(r["sgd_mean"])
    left.plot(sgd[:, 0], sgd[:, 1], "k--", lw=1.5, label="SGD mean")
    points = np.array(r["long_run_points"])
    left.scatter(
        points[:, 0], points[:, 1], s=6, color="k", alpha=0.4, label="SGD after a long run"
    )
    left.set_title(f"{r['kind']}: metric ellipses (ε = {r['eps_fraction']}/λ_max) and paths")
    right.set_title(f"fields; curl of ∇_D f up to {r['curl_relative']:.2g} of its derivatives")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
        ax.set_aspect("equal")
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    plt.close(fig)
    return Path(png)
