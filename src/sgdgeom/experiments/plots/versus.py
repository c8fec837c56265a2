"""``versus``: best and final test accuracy against one label (Musso Figs 3–5 against R,
Fig. 7 against the weight decay)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from sgdgeom.errors import InputError
from sgdgeom.experiments.plots.common import (
    finished_runs,
    group_label,
    mean_and_error,
    pyplot,
    save_png_svg,
)
from sgdgeom.experiments.plots.registry import PlotOptions, register_plot
from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import safe_name

__all__ = ["VersusOptions", "plot_versus", "versus_series"]


def versus_series(
    runs: list[dict[str, Any]], x: str, lines: str | None = None
) -> tuple[dict[str, dict[float, list[tuple[float, float]]]], dict[str, list[tuple[float, float]]]]:
    """The (best, final) test accuracies of finished ``runs``.

    Runs with the label ``x`` go by line and value of ``x``: one line per variant and value
    of ``lines``, pooling the other labels (all labels but ``x`` without ``lines``). The
    runs without ``x`` are the baselines, one per group: e.g. no smoothing and PLA, each
    its own line beside a weight-decay axis. The seed is always pooled.
    """
    series: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    baselines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        labels, final = run["labels"], run["final"]
        value = (final["best_test_acc"], final["final_test_acc"])
        if x in labels:
            pooled = () if lines is None else tuple(set(labels) - {"variant", lines, x})
            series[group_label(labels, drop=(x, *pooled))][float(labels[x])].append(value)
        else:
            baselines[group_label(labels)].append(value)
    return series, baselines


def plot_versus(
    store: ResultStore,
    sweep: str,
    x: str,
    lines: str | None,
    path: str | Path,
    *,
    log_x: bool = True,
    y_range: tuple[float, float] | None = Field(None, strict=False),  # YAML gives a list,
) -> list[Path]:
    """Best (left) and final (right) test accuracy against the label ``x``, one line per
    value of ``lines`` and variant (:func:`versus_series`); returns the PNG and SVG paths.
    ``y_range`` zooms the accuracy axis; means below it are marked ▼ on its lower edge."""
    plt = pyplot()
    series, baselines = versus_series(finished_runs(store, sweep), x, lines)
    if not series:
        raise InputError(f"no finished run of sweep {sweep!r} has the label {x!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for column, title in enumerate(("best test accuracy", "final test accuracy")):
        ax = axes[column]
        for line, points in sorted(series.items()):
            xs = sorted(points)
            stats = [mean_and_error([v[column] for v in points[x_]]) for x_ in xs]
            means = np.array([float(m) for m, _ in stats])
            drawn = ax.errorbar(
                xs,
                means,
                yerr=[float(e) for _, e in stats],
                marker="o",
                ms=4,
                capsize=3,
                label=line,
            )
            if y_range is not None and (means < y_range[0]).any():
                below = [x_ for x_, m in zip(xs, means, strict=True) if m < y_range[0]]
                ax.plot(
                    below,
                    [y_range[0]] * len(below),
                    "v",
                    ms=9,
                    clip_on=False,
                    color=drawn[0].get_color(),
                )
        for i, (name, values) in enumerate(sorted(baselines.items())):
            level, error = (float(t) for t in mean_and_error([v[column] for v in values]))
            grey = str(0.45 * i / max(len(baselines) - 1, 1))
            style = ("--", ":", "-.")[i % 3]
            ax.axhline(level, ls=style, color=grey, lw=1, label=f"{name} (no {x})")
            ax.axhspan(level - error, level + error, color=grey, alpha=0.08, lw=0)
        if log_x:
            ax.set_xscale("log")
        if y_range is not None:
            ax.set_ylim(*y_range)
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{sweep}: test accuracy against {x} (mean ± s.e. over seeds)")
    fig.tight_layout()
    return save_png_svg(fig, Path(path))


@register_plot("versus")
class VersusOptions(PlotOptions):
    """Best and final test accuracy against the label ``x``, one line per value of ``lines``
    (:func:`plot_versus`); ``y_range`` zooms the accuracy axis (points below it are drawn on
    its lower edge as ▼)."""

    kind: Literal["versus"] = "versus"
    x: str
    lines: str | None = None
    log_x: bool = True
    y_range: tuple[float, float] | None = Field(None, strict=False)  # YAML gives a list

    @model_validator(mode="after")
    def _ordered_range(self) -> VersusOptions:
        if self.y_range is not None and not self.y_range[0] < self.y_range[1]:
            raise ValueError(f"y_range must be [low, high] with low < high, got {self.y_range}")
        return self

    def labels(self) -> set[str]:
        return {self.x}

    def draw(self, store: ResultStore, sweep: str, out_dir: Path) -> list[Path]:
        stem = safe_name(f"{sweep}-versus-{self.x}")
        return plot_versus(
            store,
            sweep,
            self.x,
            self.lines,
            out_dir / stem,
            log_x=self.log_x,
            y_range=self.y_range,
        )
