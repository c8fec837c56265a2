"""Does a deterministic model track SGD? The geodesic experiment on a two-layer network.

From one initial point, on a small real dataset, the experiment integrates the GD flow,
the metric flow (F10; weak and exact) and the geodesic equation (F8; weak and exact
Christoffel symbols) for several ε, runs an ensemble of SGD runs and the Chaudhari-Soatto
SDE, and measures over time the distance between the SGD-ensemble mean and each model,
the terms the (F8) → (F10) reduction drops, and, at the same points, (F12)'s current and
the curl of ∇_D f (:class:`~sgdgeom.monitors.CurrentMonitor`). It writes ``geodesic.json``,
``distances.png`` and ``residuals.png`` (plots from the JSON alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sgdgeom.data import load_dataset
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import load_yaml_as
from sgdgeom.experiments.kinds import ExperimentKind, into_out, register_kind
from sgdgeom.files import atomic_write_bytes, save_figure
from sgdgeom.geometry import (
    RESIDUAL_LEVELS,
    chaudhari_soatto_sde,
    geodesic,
    gradient_flow,
    metric_flow,
    residuals,
    set_parameters,
    sgd_ensemble,
)
from sgdgeom.metric import INVERSES
from sgdgeom.models import build_model
from sgdgeom.monitors import CurrentMonitor
from sgdgeom.params import ParamSpace

__all__ = ["KIND", "GeodesicConfig", "load_geodesic_config", "plot_geodesic", "run_geodesic"]

EXACT_DIVERGENCE_LIMIT = 1024  # parameters up to which ∇·D is exact (d Hessian passes)


class GeodesicConfig(BaseModel):
    """A geodesic experiment: ``problem: two-layer`` (a network on real data, several ε) or
    a two-parameter problem (``quadratic``, ``rosenbrock``; the first ε fraction is used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    seed: int = 0
    problem: Literal["two-layer", "quadratic", "aligned", "rosenbrock"] = "two-layer"
    dataset: Literal["digits", "mnist1d"] = "digits"
    n: int = Field(128, ge=4)
    hidden: int = Field(8, ge=1)
    activation: Literal["tanh", "relu"] = "tanh"
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(16, ge=1)
    runs: int = Field(32, ge=2)
    t_end: float = Field(10.0, gt=0)
    points: int = Field(21, ge=3)
    eps_fractions: list[float] = [0.1, 0.5]
    residual_points: int = Field(6, ge=3)
    rtol: float = 1e-6
    atol: float = 1e-8


def load_geodesic_config(path: str | Path) -> GeodesicConfig:
    """Read and validate a geodesic experiment config (YAML)."""
    return load_yaml_as(GeodesicConfig, path)


def run_geodesic(config: GeodesicConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the experiment and write ``geodesic.json`` and its plots."""
    for fraction in config.eps_fractions:
        if not 0 < fraction < 1:
            raise ConfigError(
                f"eps_fractions must lie in (0, 1) (ε = fraction/λ_max), got {fraction}"
            )
    if not config.eps_fractions:
        raise ConfigError("eps_fractions must name at least one fraction of 1/λ_max")
    out = Path(out_dir)
    if config.problem != "two-layer":
        from sgdgeom.experiments.plane import run_plane

        return run_plane(
            config.problem,
            out,
            eps_fraction=config.eps_fractions[0],
            n=config.n,
            t_end=config.t_end,
            lr=config.lr,
            batch_size=config.batch_size,
            runs=config.runs,
            seed=config.seed,
        )
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(config.dataset)
    x = ds.normalize(ds.x_train[: config.n]).double().flatten(1)
    y = ds.y_train[: config.n]
    data = (x, y)
    torch.manual_seed(config.seed)
    model = build_model(
        "mlp", (x.shape[1],), ds.num_classes, widths=[config.hidden], activation=config.activation
    ).double()
    x0 = ParamSpace(model).vector(model)
    lam = DiffusionMatrix(model, "cross_entropy", data, chunk_size=None).lambda_max()
    t = np.linspace(0, config.t_end, config.points)
    steps = round(config.t_end / config.lr)
    ensemble = sgd_ensemble(
        model,
        "cross_entropy",
        data,
        x0,
        lr=config.lr,
        batch_size=config.batch_size,
        steps=steps,
        runs=config.runs,
        generator=torch.Generator().manual_seed(config.seed),
    )
    sgd_mean = np.stack(
        [np.interp(t, ensemble["t"], ensemble["mean"][:, j]) for j in range(len(x0))], 1
    )
    spread = np.sqrt(np.array([np.trace(c) for c in ensemble["cov"]]))
    sde = chaudhari_soatto_sde(
        model,
        "cross_entropy",
        data,
        x0,
        lr=config.lr,
        batch_size=config.batch_size,
        t_end=config.t_end,
        dt=config.t_end / (config.points - 1),
        paths=8,
        generator=torch.Generator().manual_seed(config.seed + 1),
    )
    rtol, atol = config.rtol, config.atol
    trajectories = {"gd": gradient_flow(model, "cross_entropy", data, x0, t, rtol=rtol, atol=atol)}
    for fraction in config.eps_fractions:
        eps = Epsilon.auto(fraction).resolve(lam)
        for inverse in INVERSES:
            for label, integrate in (("metric", metric_flow), ("geodesic", geodesic)):
                trajectories[f"{label}-{inverse} ε={fraction}/λ"] = integrate(
                    model, "cross_entropy", data, x0, t, eps, inverse=inverse, rtol=rtol, atol=atol
                )
    distances = {
        name: np.linalg.norm(traj.x - sgd_mean, axis=1).tolist()
        for name, traj in trajectories.items()
    }
    distances["SDE mean"] = np.linalg.norm(sde["mean"] - sgd_mean, axis=1).tolist()
    # the reduction (F8) -> (F10): the geodesic against the metric flow, and dropped terms
    middle = config.eps_fractions[len(config.eps_fractions) // 2]
    geo = trajectories[f"geodesic-exact ε={middle}/λ"]
    gap = {
        f: np.linalg.norm(
            trajectories[f"geodesic-exact ε={f}/λ"].x - trajectories[f"metric-exact ε={f}/λ"].x,
            axis=1,
        ).tolist()
        for f in config.eps_fractions
    }
    pick = np.linspace(0, len(t) - 1, config.residual_points).round().astype(int)
    assert geo.a is not None  # a geodesic carries its accelerations
    sub = type(geo)(geo.t[pick], geo.x[pick], geo.v[pick], geo.f[pick], geo.info, geo.a[pick])
    middle_eps = Epsilon.auto(middle).resolve(lam)
    sub_res = residuals(model, "cross_entropy", data, sub, middle_eps)
    # (F11)-(F12) at the same points: the current's divergence term and the curl of ∇_D f
    beta = 2 * config.batch_size / config.lr
    monitor = CurrentMonitor(
        data,
        eps=middle_eps,
        probes=None if len(x0) <= EXACT_DIVERGENCE_LIMIT else 32,
        beta=beta,
        seed=config.seed,
    )
    steady = []
    for point in sub.x:
        set_parameters(model, torch.as_tensor(point))
        steady.append(monitor.measure_now(model))
    table = sorted(((float(np.mean(d)), name) for name, d in distances.items()))
    result = {
        "config": config.model_dump(mode="json"),
        "d": len(x0),
        "N": len(y),
        "lambda_max_at_x0": lam,
        "t": t.tolist(),
        "sgd_spread": np.interp(t, ensemble["t"], spread).tolist(),
        "distances": distances,
        "geodesic_minus_metric_flow": gap,
        "residuals": {
            "t": sub.t.tolist(),
            "eps_fraction": middle,
            **{k: v.tolist() for k, v in sub_res.items()},
        },
        "current": {
            "t": sub.t.tolist(),
            "beta": beta,
            "eps": middle_eps,
            **{
                key.split("/")[1]: [m[key] for m in steady]
                for key in steady[0]
                if key not in ("current/beta", "current/eps")
            },
        },
        "loss": {name: traj.f.tolist() for name, traj in trajectories.items()},
        "tracking_table": [
            {"model": name, "mean_distance_to_sgd_mean": value} for value, name in table
        ],
    }
    atomic_write_bytes(out / "geodesic.json", json.dumps(result, indent=1).encode())
    plot_geodesic(out / "geodesic.json", out)
    return result


def plot_geodesic(json_path: str | Path, out_dir: str | Path) -> list[Path]:
    """``distances.png`` and ``residuals.png`` from ``geodesic.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(json_path).read_text())
    t = np.array(result["t"])
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, values in result["distances"].items():
        style = "--" if name.startswith("geodesic") else "-"
        ax.plot(t, values, ls=style, label=name)
    ax.plot(t, result["sgd_spread"], color="k", lw=0.8, ls=":", label="SGD spread √tr Cov")
    ax.set_xlabel("t (units of learning rate × steps)")
    ax.set_ylabel("‖x_model(t) − E x_SGD(t)‖")
    ax.set_title(f"which model tracks the SGD mean? d={result['d']}, N={result['N']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(out_dir) / "distances.png", dpi=120)
    plt.close(fig)
    res = result["residuals"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, kept in RESIDUAL_LEVELS.items():
        ratio = np.array(res[key]) / np.maximum(np.array(res[kept]), 1e-300)
        label = f"{key} / {'‖Hẋ‖' if kept == 'force' else '‖∇f‖'}"
        ax.semilogy(res["t"], np.maximum(ratio, 1e-300), marker="o", label=label)
    ax.set_xlabel("t")
    ax.set_ylabel("dropped term / kept term of the same equation")
    ax.set_title(f"dropped terms along the exact geodesic, ε={res['eps_fraction']}/λ_max")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(out_dir) / "residuals.png", dpi=120)
    plt.close(fig)
    return [Path(out_dir) / "distances.png", Path(out_dir) / "residuals.png"]


def _summary(result: dict[str, Any]) -> str:
    table = result.get("tracking_table") or [
        {"model": k, "mean_distance_to_sgd_mean": v}
        for k, v in result["distance_to_sgd_mean"].items()
    ]
    lines = [f"{'model':<28} {'mean distance to the SGD mean':>30}"]
    lines += [f"{row['model']:<28} {row['mean_distance_to_sgd_mean']:>30.5f}" for row in table]
    return "\n".join(lines)


def _plots(out: Path) -> list[Path]:
    if (out / "geodesic.json").is_file():
        return plot_geodesic(out / "geodesic.json", out)
    from sgdgeom.experiments.plane import plot_plane

    return [plot_plane(path, path.with_suffix(".png")) for path in sorted(out.glob("plane-*.json"))]


KIND = register_kind(
    ExperimentKind(
        name="geodesic",
        help="Geodesics, metric flows and GD against SGD ensembles, with the dropped terms.",
        config=GeodesicConfig,
        run=into_out(lambda config, out, progress: run_geodesic(config, out)),
        summary=_summary,
        plots=_plots,
    )
)
