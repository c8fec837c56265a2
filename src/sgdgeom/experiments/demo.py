"""``sgdgeom demo``: the library's main job end to end, on embedded data, in a few minutes
on 2 CPU cores.

1. Train Musso's 784-784-784-10 network on MNIST-5k three ways, as a sweep recorded in a
   result store: momentum SGD (with the layer-temperature monitor, Musso eq. 2), PLA on
   ``fc2`` (Musso eq. 23) and DiffusionMetricSGD (Fioresi et al. eq. 10, weak field).
2. Measure the diffusion matrix of the trained SGD network on ``spectrum_n`` samples:
   rank, λ_max, the full spectrum and the per-layer traces (F2, F3).
3. Draw the layer temperatures of the SGD run (Musso Fig. 1, in miniature).
4. Integrate the geodesic, the metric flows and GD on the two-parameter quadratic problem,
   against the mean of SGD runs (F8, F10).
5. Write ``report.html`` with all of it, and return its path.

Everything is resumable: running the demo again skips the finished training runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sgdgeom.experiments.kinds import ExperimentKind, RunContext, register_kind
from sgdgeom.experiments.plots.curves import CurvesOptions
from sgdgeom.experiments.report import SECTIONS, write_report
from sgdgeom.experiments.sweep import SweepConfig, expand_sweep, run_sweep
from sgdgeom.files import atomic_write_bytes

__all__ = ["KIND", "DemoConfig", "demo_sweep", "run_demo"]


def demo_sweep(epochs: int = 5, n_train: int | None = None) -> SweepConfig:
    """The demo's three trainings as a sweep config."""
    data: dict[str, Any] = {"name": "mnist5k", "batch_size": 64}
    if n_train is not None:
        data["n_train"] = n_train
    return SweepConfig(
        name="demo",
        base={
            "seed": 0,
            "data": data,
            "model": {"name": "fc", "depth": 2, "width": 784, "activation": "relu"},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": epochs},
        },
        variants={
            "sgd": {"monitor": {"temperature": True}},
            "pla-fc2": {"loss": {"name": "pla", "layers": ["fc2"], "R": 0.05, "y": 4}},
            "diffusion-sgd": {
                "optimizer": {
                    "name": "diffusion-metric-sgd",
                    "inverse": "weak",
                    "eps": "auto",
                    "fused": "on",
                }
            },
        },
        plots=[CurvesOptions()],
    )


def _spectrum_section(run_dir: Path, out: Path, n: int, progress: bool) -> dict[str, Any]:
    from sgdgeom.experiments.spectrum import spectrum_report
    from sgdgeom.experiments.spectrum import write_report as write_spectrum

    report = spectrum_report(
        None, None, n=n, checkpoint=run_dir / "checkpoint.pt", progress=progress, device="cpu"
    )
    _, plot = write_spectrum(report, out / "spectrum")
    rows = [["quantity", "value"]] + [
        [key, report[key]]
        for key in ("d", "N", "rank_bound", "rank", "lambda_max", "trace", "effective_rank")
    ]
    rows += [
        [f"tr D_I / N_I, {name}", layer["per_param"]] for name, layer in report["layers"].items()
    ]
    return {
        "title": "Diffusion matrix of the trained SGD network (Fioresi et al. F2, F3)",
        "text": f"D on the first {report['N']} training samples, float64: the rank is at most "
        "N − 1, the bound (F3), and the spectrum falls over orders of magnitude.",
        "table": rows,
        "images": [str(plot.relative_to(out))],
    }


def _temperature_section(run_dir: Path, out: Path) -> dict[str, Any]:
    regimes = json.loads((run_dir / "regimes.json").read_text())
    rows = [["quantity", "value"]] + [
        [key, value] for key, value in regimes.items() if isinstance(value, int | float)
    ]
    return {
        "title": "Layer temperatures of the SGD run (Musso eq. 2, Fig. 1)",
        "text": "Per-layer signal and noise of the weight updates, epoch by epoch.",
        "table": rows,
        "images": [str((run_dir / "temperatures.png").relative_to(out))],
    }


def _geodesic_section(out: Path, runs: int) -> dict[str, Any]:
    from sgdgeom.experiments.plane import run_plane

    result = run_plane("quadratic", out / "geodesic", runs=runs)
    rows = [["path", "mean distance to the SGD mean"]] + [
        [name, value] for name, value in result["distance_to_sgd_mean"].items()
    ]
    return {
        "title": "Geodesics of g = I + εD on a two-parameter problem (Fioresi et al. F8, F10)",
        "text": "GD, the metric flows and the geodesic from one start, against the mean of "
        f"{runs} SGD runs with per-sample noise.",
        "table": rows,
        "images": [str((out / "geodesic" / "plane-quadratic.png").relative_to(out))],
    }


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    epochs: int = 5,
    n_train: int | None = None,
    spectrum_n: int = 1000,
    sgd_runs: int = 32,
    progress: bool = True,
) -> Path:
    """Run the demo into ``out_dir`` and return the path of its HTML report."""
    out = Path(out_dir)
    say = print if progress else (lambda *_: None)
    sweep = expand_sweep(demo_sweep(epochs, n_train), out, "demo")
    names = ", ".join(r.name for r in sweep.runs)
    say(f"[1/4] training the 784-784-784-10 net on MNIST-5k: {names}")
    run_sweep(sweep, out, workers=1, progress=progress)
    sgd_dir = Path(next(r.run_dir for r in sweep.runs if r.labels["variant"] == "sgd"))
    say(f"[2/4] the diffusion matrix of the trained SGD net on {spectrum_n} samples")
    sections = [_spectrum_section(sgd_dir, out, spectrum_n, progress)]
    say("[3/4] layer temperatures of the SGD run")
    sections.append(_temperature_section(sgd_dir, out))
    say("[4/4] geodesics and metric flows on the two-parameter quadratic problem")
    sections.append(_geodesic_section(out, sgd_runs))
    atomic_write_bytes(out / SECTIONS, json.dumps(sections, indent=1).encode())
    return write_report(out, title="sgdgeom demo")


class DemoConfig(BaseModel):
    """The options of ``sgdgeom demo``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(5, ge=1, description="Epochs of each training.")
    n_train: int | None = Field(None, ge=1, description="Train on the first N samples only.")
    spectrum_n: int = Field(1000, ge=2, description="Samples in the diffusion matrix.")
    sgd_runs: int = Field(32, ge=2, description="SGD runs averaged in the geodesic panel.")


def _run(config: DemoConfig, context: RunContext) -> dict[str, Any]:
    assert context.out is not None
    report = run_demo(
        context.out,
        epochs=config.epochs,
        n_train=config.n_train,
        spectrum_n=config.spectrum_n,
        sgd_runs=config.sgd_runs,
        progress=context.progress,
    )
    return {"report": str(report)}


def _figures(out: Path) -> list[Path]:
    """The demo's figures are those of the kinds and the sweep it runs, drawn where they
    ran; its own output is the report that gathers them."""
    return sorted(out.rglob("*.png"))


KIND = register_kind(
    ExperimentKind(
        name="demo",
        help="The main job on embedded data: SGD, PLA and DiffusionMetricSGD on MNIST-5k, the "
        "diffusion spectrum, layer temperatures, a geodesic, and an HTML report.",
        config=DemoConfig,
        run=_run,
        summary=lambda result: f"report: {result['report']}",
        plots=_figures,
        source="options",
        out="runs/demo",
    )
)
