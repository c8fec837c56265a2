"""``curves``: training loss and test accuracy per epoch, one line per group of runs
(Musso Figs 6–8)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from sgdgeom.errors import InputError
from sgdgeom.experiments.plots.common import (
    curve_label,
    group_label,
    mean_and_error,
    pyplot,
    save_png_svg,
)
from sgdgeom.experiments.plots.registry import PlotOptions, register_plot
from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import safe_name

__all__ = ["CurvesOptions", "plot_store_curves"]


def plot_store_curves(store: ResultStore, sweep: str, path: str | Path) -> list[Path]:
    """Training loss (log scale) and test accuracy per epoch, one line per group of runs
    (mean over seeds, up to the group's shortest run); a group with unfinished runs says
    so in the legend. Returns the PNG and SVG paths."""
    plt = pyplot()
    groups: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    unfinished: dict[str, int] = defaultdict(int)
    for run in store.runs(sweep):
        records = store.epochs(run["hash"])
        if records:
            name = group_label(run["labels"])
            groups[name].append(records)
            unfinished[name] += run["status"] != "finished"
    if not groups:
        raise InputError(f"sweep {sweep!r} has no recorded epochs yet")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, runs in sorted(groups.items()):
        epochs = min(len(r) for r in runs)
        xs = [runs[0][i]["epoch"] for i in range(epochs)]
        label = curve_label(name, len(runs), unfinished[name])
        for ax, key in zip(axes, ("train_loss", "test_acc"), strict=True):
            ys, error = mean_and_error([[r[i][key] for i in range(epochs)] for r in runs])
            (line,) = ax.plot(xs, ys, label=label, lw=1.2)
            ax.fill_between(xs, ys - error, ys + error, color=line.get_color(), alpha=0.2, lw=0)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{sweep}: curves per variant (mean ± s.e. over seeds)")
    fig.tight_layout()
    return save_png_svg(fig, Path(path))


@register_plot("curves")
class CurvesOptions(PlotOptions):
    """Loss and accuracy per epoch, one line per group of runs (:func:`plot_store_curves`)."""

    kind: Literal["curves"] = "curves"

    def draw(self, store: ResultStore, sweep: str, out_dir: Path) -> list[Path]:
        return plot_store_curves(store, sweep, out_dir / safe_name(f"{sweep}-curves"))
