"""The spectrum report: D's size, rank, spectrum and per-layer traces for a model and data.

Fioresi et al. (F3) bound the rank of D by ``N - 1``; their Table 1 lists ``d``, ``N`` and
that bound for common networks. :func:`spectrum_report` measures the real numbers for any
model of :mod:`sgdgeom.models` on any dataset, and :func:`plot_spectrum` draws them from the
report alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sgdgeom.data import load_dataset
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import ConfigError, SgdgeomError
from sgdgeom.experiments.config import parse_config, read_yaml
from sgdgeom.files import atomic_write_bytes, load_checkpoint, save_figure
from sgdgeom.models import build_model
from sgdgeom.train import resolve_device

__all__ = ["format_report", "plot_spectrum", "spectrum_report", "write_report"]


def _load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The weights of a checkpoint (``weights_only=True``) and the config of its run folder."""
    state = load_checkpoint(path)
    weights = state.get("model", state)
    config_path = path.parent / "config.yaml"
    config = read_yaml(config_path) if config_path.is_file() else None
    return weights, config


def spectrum_report(
    model_name: str | None,
    dataset_name: str | None,
    *,
    n: int | None = None,
    checkpoint: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build D for a model (initialised with ``seed``, or from a training checkpoint, whose
    run directory's config supplies the model and dataset) on the first ``n`` training
    samples, and measure it: ``d``, ``N``, the rank bound, the numerical rank, ``λ_max``,
    the trace, the effective rank, the per-layer traces and the whole nonzero spectrum."""
    weights, config = _load_checkpoint(Path(checkpoint)) if checkpoint else (None, None)
    options = dict(model_options or {})
    init = "default"
    if config is not None:
        run = parse_config(config, f"{checkpoint} config")
        model_name = model_name or run.model.name
        dataset_name = dataset_name or run.data.name
        options = {**run.model.options, **options}
    if model_name is None or dataset_name is None:
        raise ConfigError(
            "name a model and a dataset (--model, --dataset), or a --checkpoint "
            "from `sgdgeom train`"
        )
    dataset = load_dataset(dataset_name, data_root)
    if n is not None and not 2 <= n <= len(dataset.y_train):
        raise ConfigError(f"--n must be in 2..{len(dataset.y_train)} for {dataset_name}, got {n}")
    torch.manual_seed(seed)
    model = build_model(model_name, dataset.input_shape, dataset.num_classes, init=init, **options)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise SgdgeomError(
                f"checkpoint {checkpoint} does not fit model {model_name!r}: "
                f"{str(err).splitlines()[0]}"
            ) from None
    target = resolve_device(device)
    model = model.to(target, dtype).eval()
    x = dataset.normalize(dataset.x_train[:n]).to(target, dtype)
    y = dataset.y_train[:n].to(target)
    D = DiffusionMatrix(model, "cross_entropy", (x, y), chunk_size=256, progress=progress)
    values = D.eigvalsh()
    layers = D.layer_traces()
    return {
        "model": model_name,
        "model_options": options,
        "dataset": dataset_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dtype": str(dtype).removeprefix("torch."),
        "route": D.route,
        "d": D.space.dim,
        "N": D.n,
        "rank_bound": D.n - 1,
        "rank": D.rank(),
        "lambda_max": float(values[0]),
        "trace": D.trace(),
        "effective_rank": D.effective_rank(),
        "mean_loss": float(D.products.losses().mean()),
        "mean_gradient_norm": float(D.mean_gradient().norm()),
        "layers": {
            name: {"trace": t.trace, "numel": t.numel, "per_param": t.per_param}
            for name, t in layers.items()
        },
        "eigenvalues": values.tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The summary table the CLI prints."""
    rows = [
        ("model", f"{report['model']} {report['model_options'] or ''}".strip()),
        ("dataset", report["dataset"]),
        ("d (parameters)", f"{report['d']:,}"),
        ("N (samples)", f"{report['N']:,}"),
        ("rank bound N-1", f"{report['rank_bound']:,}"),
        ("numerical rank", f"{report['rank']:,}"),
        ("lambda_max", f"{report['lambda_max']:.6g}"),
        ("trace", f"{report['trace']:.6g}"),
        ("effective rank", f"{report['effective_rank']:.2f}"),
    ]
    lines = [f"{k:<16} {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'layer':<12} {'params':>12} {'tr D_I':>12} {'tr D_I / N_I':>14}")
    for name, layer in report["layers"].items():
        lines.append(
            f"{name:<12} {layer['numel']:>12,} {layer['trace']:>12.5g} {layer['per_param']:>14.5g}"
        )
    return "\n".join(lines)


def plot_spectrum(report: dict[str, Any], path: str | Path) -> Path:
    """Eigenvalues on a log scale, and a bar chart of the per-layer traces ``tr D_I / N_I``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [v for v in report["eigenvalues"] if v > 0]
    fig, (ax_spec, ax_layers) = plt.subplots(1, 2, figsize=(11, 4))
    ax_spec.semilogy(range(1, len(values) + 1), values, lw=1.2)
    ax_spec.axvline(report["rank"], color="grey", ls=":", label=f"numerical rank {report['rank']}")
    ax_spec.set_xlabel("index k")
    ax_spec.set_ylabel("eigenvalue λ_k of D")
    ax_spec.set_title(f"spectrum of D: {report['model']} on {report['dataset']}, N={report['N']}")
    ax_spec.legend()
    names = list(report["layers"])
    per_param = [report["layers"][n]["per_param"] for n in names]
    ax_layers.bar(names, per_param, color="tab:orange")
    ax_layers.set_yscale("log")
    ax_layers.set_ylabel("tr D_I / N_I")
    ax_layers.set_title("per-layer diffusion temperature")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``spectrum.json`` and ``spectrum.png`` (drawn from the JSON) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "spectrum.json"
    atomic_write_bytes(json_path, json.dumps(report, indent=1).encode())
    return json_path, plot_spectrum(json.loads(json_path.read_text()), out / "spectrum.png")
