"""Compare variants of one experiment: run each, then plot their curves from the data.

A comparison config has a ``base`` experiment config and named ``variants``, each a
partial config merged into the base (nested keys merge, values replace)::

    name: mnist5k-optimizers
    base: {data: {...}, model: {...}, optimizer: {...}, train: {...}}
    variants:
      sgd: {optimizer: {name: sgd, momentum: 0.0}}
      diffusion-exact: {optimizer: {name: diffusion-sgd, mode: exact}}

Each variant runs in ``OUT/VARIANT`` with the usual files; a finished variant (its
``final.json`` present) is kept and skipped when the comparison is run again (a variant
folder that holds another config's run is refused: an edited config needs another
``--out``), and
``--resume`` continues one that was killed. ``summary.json`` and ``curves.png`` are made
from the variants' ``metrics.jsonl`` files alone.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from sgdgeom.errors import ConfigError, InputError
from sgdgeom.experiments.config import ExperimentConfig, parse_config, read_yaml
from sgdgeom.experiments.runner import check_run_dir, run_training
from sgdgeom.files import atomic_write_bytes, read_json, read_jsonl, safe_names, save_figure
from sgdgeom.train import FINAL, METRICS

__all__ = ["load_comparison", "plot_curves", "run_comparison"]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: nested mappings merge, other values replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_comparison(path: str | Path) -> tuple[str, dict[str, ExperimentConfig]]:
    """Read a comparison config: its name and one validated config per variant."""
    data = read_yaml(path)
    if not isinstance(data, dict) or set(data) != {"name", "base", "variants"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"{path}: a comparison has exactly the keys name, base, variants; got {keys}"
        )
    if not isinstance(data["variants"], dict) or not data["variants"]:
        raise ConfigError(f"{path}: variants must be a non-empty mapping of name: overrides")
    if not isinstance(data["name"], str) or not isinstance(data["base"], dict):
        raise ConfigError(f"{path}: name must be a string and base a mapping")
    for variant, override in data["variants"].items():
        if not isinstance(variant, str) or not isinstance(override, dict | None):
            raise ConfigError(
                f"{path}: variant {variant!r}: names are strings (quote a number) and each "
                f"maps to a mapping of overrides"
            )
    configs = {}
    for variant, override in data["variants"].items():
        merged = merge({"name": f"{data['name']}/{variant}", **data["base"]}, override or {})
        configs[variant] = parse_config(merged, f"{path} variant {variant!r}")
    return data["name"], configs


def run_comparison(
    path: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data_root: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every variant (skipping finished ones), then write ``summary.json`` and
    ``curves.png``. Returns the summary: each variant's final metrics."""
    name, configs = load_comparison(path)
    out = Path(out_dir)
    folders = safe_names(configs, "variants")
    for variant, config in configs.items():
        run_dir = out / folders[variant]
        check_run_dir(config, run_dir, resume=True)  # another config's run is refused
        if (run_dir / FINAL).is_file():
            continue
        started = (run_dir / METRICS).is_file()
        run_training(
            config,
            run_dir,
            resume=resume or started,
            data_root=data_root,
            device=device,
            progress=progress,
        )
    summary = {
        "name": name,
        "variants": {v: read_json(out / f / FINAL, "final metrics") for v, f in folders.items()},
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    plot_curves(out, folders, out / "curves.png", title=name)
    return summary


def plot_curves(
    out_dir: str | Path, folders: dict[str, str], path: str | Path, title: str = ""
) -> Path:
    """Training loss, test loss and test accuracy per epoch, one line per variant, read
    from ``OUT/FOLDER/metrics.jsonl`` (``folders`` maps each variant to its folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train_loss", "training loss", True),
        ("test_loss", "test loss", True),
        ("test_acc", "test accuracy", False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for variant, folder in folders.items():
        metrics = Path(out_dir) / folder / METRICS
        records = read_jsonl(metrics)
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            epochs, values = _series(records, key, metrics)
            ax.plot(epochs, values, marker="o", ms=3, label=variant)
    for ax, (_, label, log) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def _series(records: list[dict[str, Any]], key: str, path: Path) -> tuple[list[int], list[float]]:
    """Each record's epoch and its ``key`` (a missing value, null, as NaN)."""
    try:
        epochs = [int(r["epoch"]) for r in records]
        values = [math.nan if r.get(key) is None else float(r[key]) for r in records]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: a record lacks its epoch or a number for {key}") from None
    return epochs, values
