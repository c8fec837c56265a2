"""The spectrum report: D's size, rank, spectrum and per-layer traces for a model and data.

Fioresi et al. (F3) bound the rank of D by ``N - 1``; their Table 1 lists ``d``, ``N`` and
that bound for common networks. :func:`spectrum_report` measures the real numbers for any
model of :mod:`sgdgeom.models` on any dataset, and :func:`plot_spectrum` draws them from the
report alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from pydantic import Field

from sgdgeom.alignment import alignment
from sgdgeom.diffusion import DiffusionMatrix, gram_spectrum_bytes
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
from sgdgeom.hessian import HessianOperator
from sgdgeom.linalg import MethodChoice
from sgdgeom.linalg.krylov import krylov_bytes
from sgdgeom.memory import available_bytes
from sgdgeom.monitors.temperature import within_layer_temperatures

__all__ = [
    "KIND",
    "SpectrumConfig",
    "format_report",
    "plot_spectrum",
    "spectrum_report",
    "write_report",
]


def spectrum_report(
    model_name: str | None,
    dataset_name: str | None,
    *,
    n: int | None = None,
    k: int | None = None,
    method: MethodChoice = "auto",
    hessian: bool = False,
    checkpoint: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Build D for a model (initialised with ``seed``, or from a training checkpoint, whose
    run directory's config supplies the model and dataset) on the first ``n`` training
    samples, and measure it: ``d``, ``N``, the rank bound, ``λ_max``, the trace, the
    per-layer traces, the spread of the weights' own temperatures within each layer
    (``within_layer``: Musso's footnote 7,
    :func:`~sgdgeom.monitors.temperature.within_layer_temperatures`) and

    - with ``k=None``, the whole nonzero spectrum through the ``N x N`` Gram matrix (refused
      up front when it would not fit), the numerical rank and the effective rank;
    - with ``k``, the top-k eigenpairs by ``method`` (:mod:`sgdgeom.linalg.krylov`;
      ``"auto"``: each operator's :meth:`~sgdgeom.linalg.Operator.preferred_method`), their
      residuals and cost, and with ``hessian`` the Hessian's top-k and the alignment of D
      with it (:func:`~sgdgeom.alignment.alignment`).

    ``log`` receives what the work will take before it starts (sizes, memory, a time
    estimate from the capture's own pass over the data)."""
    if method not in get_args(MethodChoice):
        choices = ", ".join(get_args(MethodChoice))
        raise ConfigError(f"--method must be one of {choices}, got {method!r}")
    if hessian and k is None:
        raise ConfigError("--hessian compares top-k eigenpairs: give --k too")
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
    model, x, y = measured.model, measured.x, measured.y
    model_name, dataset_name = measured.model_name, measured.dataset_name
    options, target = measured.model_options, x.device
    if k is not None and not 1 <= k < len(y):
        raise ConfigError(f"--k must be in 1..N-1, got {k}")
    size = len(y)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"D of {model_name} on {size:,} samples of {dataset_name}: d = {d:,} parameters")
    if k is None:
        needed = gram_spectrum_bytes(size, dtype, target)
        free = available_bytes(target)
        log(
            f"full spectrum: the {size:,} x {size:,} Gram matrix and its eigendecomposition "
            f"need {needed / 2**30:.2f} GiB"
            + (f" ({free / 2**30:.1f} GiB free)" if free is not None else "")
        )
    started = time.perf_counter()
    D = DiffusionMatrix(
        model, "cross_entropy", (x, y), chunk_size=256, cache_dir=cache_dir, progress=progress
    )
    captured = time.perf_counter() - started
    storage = getattr(D.products, "storage", "recomputed on every product")
    log(
        f"captured in {captured:.1f} s (one forward and backward over the data); "
        f"captures: {storage}"
    )
    before = time.perf_counter()
    within = within_layer_temperatures(model, "cross_entropy", (x, y))
    within_seconds = time.perf_counter() - before
    started += within_seconds  # the spectrum's and eigsh's clocks leave it out
    report: dict[str, Any] = {
        "model": model_name,
        "model_options": options,
        "dataset": dataset_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dtype": str(dtype).removeprefix("torch."),
        "route": D.route,
        "d": D.space.dim,
        "N": D.n,
        "rank_bound": D.n - 1,
        "trace": D.trace(),
        "mean_loss": float(D.products.losses().mean()),
        "mean_gradient_norm": float(D.mean_gradient().norm()),
        "layers": {
            name: {"trace": t.trace, "numel": t.numel, "per_param": t.per_param}
            for name, t in D.layer_traces().items()
        },
        "within_layer": within,
        "seconds": {"capture": captured, "within_layer": within_seconds},
    }
    if k is None:
        values = D.eigvalsh()
        report |= {
            "rank": D.rank(),
            "lambda_max": float(values[0]),
            "effective_rank": D.effective_rank(),
            "eigenvalues": values.tolist(),
        }
        report["seconds"]["spectrum"] = time.perf_counter() - started - captured
        return report
    d_method = D.preferred_method() if method == "auto" else method
    log(f"top-{k} by {d_method}: {_work(d_method, k, captured, 2 / 3)}")
    pairs = D.eigsh(k, d_method, progress=progress)
    report |= {
        "lambda_max": float(pairs.values[0]),
        "eigenvalues": pairs.values.tolist(),
        "method": pairs.method,
        "residuals": pairs.residuals.tolist(),
        "passes": pairs.passes,
        "products": pairs.products,
        "converged": pairs.converged,
    }
    report["seconds"]["eigsh"] = time.perf_counter() - started - captured
    if hessian:
        H = HessianOperator(model, "cross_entropy", (x, y), chunk_size=256, progress=False)
        h_method = H.preferred_method() if method == "auto" else method
        log(
            f"Hessian top-{k} by {h_method}, each product forward-over-reverse over the "
            f"{size:,} samples: {_work(h_method, k, captured, 2.5)}"
        )
        if h_method == "block-lanczos":
            free = available_bytes(target)
            log(
                f"block Lanczos keeps {krylov_bytes(d, k + 10, 1, dtype) / 2**30:.2f} GiB a "
                f"pass, at most 60 passes"
                + (f" or what the {free / 2**30:.1f} GiB free allow" if free is not None else "")
            )
        before = time.perf_counter()
        report["alignment"] = alignment(
            D, H, k, method=h_method, seed=seed, progress=progress, d_pairs=pairs
        ).as_dict()
        report["seconds"]["hessian"] = time.perf_counter() - before
    return report


def _work(method: str, k: int, captured: float, per_product: float) -> str:
    """What a top-k costs, in products of ``per_product`` capture passes (``captured`` s)."""
    if method == "lanczos":
        low, high = 2 * k + 10, 4 * k + 20  # ARPACK's ncv = max(2k + 1, 20), a restart or two
        return (
            f"one vector a pass, about {low}-{high} products "
            f"(~{low * per_product * captured:.0f}-{high * per_product * captured:.0f} s)"
        )
    block = k + 10
    return (
        f"each block pass multiplies {block} vectors, about {block * per_product:.0f}x the "
        f"capture's pass in arithmetic (~{block * per_product * captured:.0f} s a pass)"
    )


def format_report(report: dict[str, Any]) -> str:
    """The summary table the CLI prints."""
    rows = [
        ("model", f"{report['model']} {report['model_options'] or ''}".strip()),
        ("dataset", report["dataset"]),
        ("d (parameters)", f"{report['d']:,}"),
        ("N (samples)", f"{report['N']:,}"),
        ("rank bound N-1", f"{report['rank_bound']:,}"),
        ("lambda_max", f"{report['lambda_max']:.6g}"),
        ("trace", f"{report['trace']:.6g}"),
    ]
    if "rank" in report:
        rows += [
            ("numerical rank", f"{report['rank']:,}"),
            ("effective rank", f"{report['effective_rank']:.2f}"),
        ]
    else:
        rows += [
            (f"top-{len(report['eigenvalues'])}", report["method"]),
            ("passes", f"{report['passes']} ({report['products']} vector products)"),
            ("max residual", f"{max(report['residuals']):.2e} (‖Du − λu‖)"),
        ]
    if "alignment" in report:
        a = report["alignment"]
        rows += [
            ("lambda_max(H)", f"{a['h_values'][0]:.6g}"),
            ("tr(DH)/|D||H|", f"{a['cosine']:.4f} ± {a['cosine_stderr']:.4f}"),
            ("top-k cosine", f"{a['cosine_topk']:.4f}"),
            ("top-k overlap", f"{a['overlap']:.4f}"),
        ]
    lines = [f"{k:<16} {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'layer':<12} {'params':>12} {'tr D_I':>12} {'tr D_I / N_I':>14}")
    for name, layer in report["layers"].items():
        lines.append(
            f"{name:<12} {layer['numel']:>12,} {layer['trace']:>12.5g} {layer['per_param']:>14.5g}"
        )
    if report.get("within_layer"):
        lines += ["", "each weight's own temperature D_ww within its layer (Musso footnote 7):"]
        lines.append(f"{'layer':<12} {'q90 / q10':>10} {'split-half r':>13} {'zero':>7}")
        for name, row in report["within_layer"].items():
            lines.append(
                f"{name:<12} {row['ratio_90_10']:>10.3g} {row['split_half_correlation']:>13.3f} "
                f"{row['zero_fraction']:>7.1%}"
            )
    return "\n".join(lines)


def plot_spectrum(report: dict[str, Any], path: str | Path) -> Path:
    """Eigenvalues on a log scale (D's, and with the Hessian its top-k and D's Rayleigh
    quotients along H's eigenvectors, the alignment in the title), and a bar chart of the
    per-layer traces ``tr D_I / N_I``."""
    plt = pyplot()
    values = [v for v in report["eigenvalues"] if v > 0]
    fig, (ax_spec, ax_layers) = plt.subplots(1, 2, figsize=(11, 4))
    index = range(1, len(values) + 1)
    ax_spec.semilogy(index, values, lw=1.2, marker="." if len(values) <= 100 else None, label="D")
    if "rank" in report:
        ax_spec.axvline(
            report["rank"], color="grey", ls=":", label=f"numerical rank {report['rank']}"
        )
    title = f"spectrum of D: {report['model']} on {report['dataset']}, N={report['N']}"
    if "alignment" in report:
        a = report["alignment"]
        positive = [(i + 1, v) for i, v in enumerate(a["h_values"]) if v > 0]
        ax_spec.semilogy(*zip(*positive, strict=True), marker="s", ms=3, lw=1, label="H")
        ax_spec.semilogy(
            range(1, len(a["rayleigh"]) + 1),
            a["rayleigh"],
            marker="x",
            ls="--",
            lw=1,
            label="v_jᵀ D v_j (H's eigenvectors)",
        )
        title += f"\ntr(DH)/‖D‖‖H‖ = {a['cosine']:.3f}, top-k overlap {a['overlap']:.3f}"
    ax_spec.set_xlabel("index k")
    ax_spec.set_ylabel("eigenvalue")
    ax_spec.set_title(title, fontsize=9)
    ax_spec.legend(fontsize=8)
    layers = {name: layer["per_param"] for name, layer in report["layers"].items()}
    layer_bars(ax_layers, layers, "tab:orange", "tr D_I / N_I", "per-layer diffusion temperature")
    return finish_png(fig, path)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``spectrum.json`` and ``spectrum.png`` (drawn from the JSON) into ``out_dir``."""
    return write_json_and_plot(report, out_dir, "spectrum", plot_spectrum)


class SpectrumConfig(MeasuredConfig):
    """The options of ``sgdgeom spectrum`` (:func:`spectrum_report`)."""

    k: int | None = Field(
        None, description="Only the top k eigenpairs, from products (no N x N matrix): for large N."
    )
    method: MethodChoice = Field(
        "auto",
        description="With --k: auto (lanczos on the CPU with captures in memory, else "
        "block-lanczos), block-lanczos, randomized, or lanczos (one vector a pass).",
    )
    hessian: bool = Field(
        False, description="With --k: the Hessian's top k too, and its alignment with D."
    )
    cache_dir: Path | None = Field(
        None, description="Keep captures that do not fit in memory in memory-mapped files here."
    )


def _measure(config: SpectrumConfig, context: RunContext) -> dict[str, Any]:
    return spectrum_report(
        config.model,
        config.dataset,
        k=config.k,
        method=config.method,
        hessian=config.hessian,
        cache_dir=config.cache_dir,
        progress=context.progress,
        log=context.log,
        **measured_options(config),
    )


KIND = register_kind(
    measuring_kind(
        "spectrum",
        "The diffusion matrix's size, rank, spectrum and per-layer traces (Fioresi et al., "
        "F3); with --k its top k by block methods, and with --hessian its alignment with "
        "the Hessian.",
        SpectrumConfig,
        _measure,
        format_report,
        plot_spectrum,
    )
)
