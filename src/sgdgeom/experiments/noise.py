"""The noise report: the gradient noise scale of a model over a whole dataset, exactly.

``tr D``, ``‖ḡ‖²`` and ``B_noise = tr D / ‖ḡ‖²`` (McCandlish et al. 2018; D is their Σ over
the dataset, ḡ their G: :mod:`sgdgeom.noise`), in total and per layer, for any model of
:mod:`sgdgeom.models` on any dataset, at its initialisation or at a training checkpoint;
with ``k`` the top eigenvalues of D beside them. :func:`plot_noise` draws the predicted
trade-off between steps and examples over batch sizes, and the layers' noise scales, from
the report alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.kinds import RunContext, register_kind
from sgdgeom.experiments.measured import (
    MeasuredConfig,
    load_measured,
    measured_options,
    measuring_kind,
    write_json_and_plot,
)
from sgdgeom.experiments.plots.common import finish_png, layer_bars, pyplot
from sgdgeom.noise import dataset_noise, examples_ratio, steps_ratio

__all__ = ["KIND", "NoiseConfig", "format_noise", "noise_report", "plot_noise", "write_noise"]


def noise_report(
    model_name: str | None,
    dataset_name: str | None,
    *,
    n: int | None = None,
    k: int | None = None,
    checkpoint: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Build D over the first ``n`` training samples (all by default) and report the noise
    scale exactly, per layer, with the critical batch size it predicts; with ``k``, the top
    k eigenvalues of D (Lanczos on products)."""
    measured = load_measured(
        model_name,
        dataset_name,
        n=n,
        checkpoint=checkpoint,
        model_options=model_options,
        data_root=data_root,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    if k is not None and not 1 <= k < len(measured.y):
        raise ConfigError(f"--k must be in 1..N-1, got {k}")
    log(
        f"D of {measured.model_name} on {len(measured.y):,} samples of "
        f"{measured.dataset_name}: one forward and backward over them"
    )
    D = DiffusionMatrix(
        measured.model, "cross_entropy", (measured.x, measured.y), chunk_size=256, progress=progress
    )
    estimate = dataset_noise(D)
    report: dict[str, Any] = {
        "model": measured.model_name,
        "model_options": measured.model_options,
        "dataset": measured.dataset_name,
        "checkpoint": measured.checkpoint,
        "dtype": str(dtype).removeprefix("torch."),
        "route": D.route,
        "d": D.space.dim,
        "N": D.n,
        "trace": estimate.trace,
        "grad_sq": estimate.grad_sq,
        "b_noise": estimate.b_noise,
        "layers": {
            name: {"trace": trace, "grad_sq": grad_sq, "b_noise": estimate.layer_b_noise()[name]}
            for name, (trace, grad_sq) in estimate.layers.items()
        },
    }
    if k is not None:
        report["eigenvalues"] = D.eigsh(k, progress=progress).values.tolist()
    return report


def format_noise(report: dict[str, Any]) -> str:
    """The summary table the CLI prints."""
    b_noise = report["b_noise"]
    lines = [
        f"{report['model']} on {report['dataset']} (N = {report['N']:,}, d = {report['d']:,}, "
        f"{report['route']} route)",
        f"tr D (tr Σ)       {report['trace']:.6g}",
        f"‖ḡ‖² (‖G‖²)       {report['grad_sq']:.6g}",
        f"B_noise           {b_noise:.6g}   (the critical batch size)",
    ]
    if math.isfinite(b_noise):
        for batch in _batches(b_noise):
            lines.append(
                f"  at B = {batch:>6}: steps {steps_ratio(b_noise, batch):.3g} x the fewest, "
                f"examples {examples_ratio(b_noise, batch):.3g} x the fewest"
            )
    if "eigenvalues" in report:
        top = ", ".join(f"{v:.4g}" for v in report["eigenvalues"][:5])
        lines.append(f"top eigenvalues of D: {top}")
    lines.append("")
    lines.append(f"{'layer':<16} {'tr D_I':>12} {'‖ḡ_I‖²':>12} {'B_noise':>12}")
    for name, layer in report["layers"].items():
        lines.append(
            f"{name:<16} {layer['trace']:>12.5g} {layer['grad_sq']:>12.5g} "
            f"{layer['b_noise']:>12.5g}"
        )
    return "\n".join(lines)


def _batches(b_noise: float) -> list[int]:
    """Powers of two around ``B_noise``, a decade either side."""
    low = max(0, math.floor(math.log2(max(b_noise, 1.0) / 10)))
    return [2**e for e in range(low, low + 8)]


def plot_noise(report: dict[str, Any], path: str | Path) -> Path:
    """The predicted trade-off ``S/S_min`` against ``E/E_min`` over batch sizes (McCandlish
    et al., Fig. 2), marking ``B_noise``, and a bar chart of the layers' ``B_noise``."""
    plt = pyplot()
    fig, (ax_curve, ax_layers) = plt.subplots(1, 2, figsize=(11, 4))
    b_noise = report["b_noise"]
    if math.isfinite(b_noise) and b_noise > 0:
        batches = [b_noise * 2.0**e for e in torch.linspace(-6, 6, 121).tolist()]
        examples = [examples_ratio(b_noise, b) for b in batches]
        steps = [steps_ratio(b_noise, b) for b in batches]
        ax_curve.loglog(examples, steps, lw=1.5)
        ax_curve.plot([2], [2], "o", color="tab:red", label=f"B = B_noise = {b_noise:.3g}")
        for batch in _batches(b_noise)[::2]:
            point = (examples_ratio(b_noise, batch), steps_ratio(b_noise, batch))
            ax_curve.plot(*point, ".", color="grey")
            ax_curve.annotate(
                f"B={batch}", point, fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax_curve.legend(fontsize=8)
    ax_curve.set_xlabel("examples / fewest examples (E / E_min)")
    ax_curve.set_ylabel("steps / fewest steps (S / S_min)")
    ax_curve.set_title(
        f"predicted trade-off: {report['model']} on {report['dataset']}, N={report['N']}",
        fontsize=9,
    )
    layers = {name: layer["b_noise"] for name, layer in report["layers"].items()}
    layer_bars(ax_layers, layers, "tab:green", "B_noise of the layer", "per-layer noise scale")
    return finish_png(fig, path)


def write_noise(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``noise.json`` and ``noise.png`` (drawn from the JSON) into ``out_dir``."""
    return write_json_and_plot(report, out_dir, "noise", plot_noise)


class NoiseConfig(MeasuredConfig):
    """The options of ``sgdgeom noise`` (:func:`noise_report`)."""

    k: int | None = Field(None, description="Also the top k eigenvalues of D (from products).")


def _measure(config: NoiseConfig, context: RunContext) -> dict[str, Any]:
    return noise_report(
        config.model,
        config.dataset,
        k=config.k,
        progress=context.progress,
        log=context.log,
        **measured_options(config),
    )


KIND = register_kind(
    measuring_kind(
        "noise",
        "The gradient noise scale B_noise = tr D / |g|^2 and the critical batch size "
        "(McCandlish et al. 2018) over a whole dataset, exactly, per layer, with the "
        "predicted steps/examples trade-off as a plot.",
        NoiseConfig,
        _measure,
        format_noise,
        plot_noise,
    )
)
