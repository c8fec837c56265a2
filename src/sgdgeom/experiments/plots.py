"""Figures made from the result store alone (PNG and SVG), so that any sweep — finished,
partial or merged from several machines — can be plotted again without rerunning it.

- :func:`plot_versus`: best and final test accuracy against one label (e.g. ``loss.R``),
  one line per value of another (e.g. ``loss.layers``), mean ± standard error over the
  remaining labels such as seeds; runs without the x label (the unregularised baseline)
  are drawn as horizontal lines with their band. Musso Figs 3–5 (x = R) and Fig. 7 (x =
  weight decay).
- :func:`plot_store_curves`: training loss and test accuracy per epoch, one line per group
  of runs, mean ± standard error over seeds as a band. Musso Figs 6–8.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.errors import InputError
from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import safe_name, save_figure

__all__ = [
    "curve_label",
    "group_label",
    "mean_and_error",
    "plot_store_curves",
    "plot_sweep",
    "plot_versus",
    "versus_series",
]

_IGNORED_LABELS = ("seed",)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> list[Path]:
    """Save as ``path.png`` and ``path.svg`` (``path`` is a stem; dots in it are kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.parent / f"{path.name}.{suffix}" for suffix in ("png", "svg")]
    for target in out:
        save_figure(fig, target, dpi=120)
    _pyplot().close(fig)
    return out


def group_label(labels: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """The name of a group of runs: its labels without the seed and ``drop``."""
    parts = [
        f"{k.split('.')[-1]}={v}" if k != "variant" else str(v)
        for k, v in labels.items()
        if k not in _IGNORED_LABELS and k not in drop
    ]
    return " ".join(parts) or "all"


def mean_and_error(values: Any, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean (``std / sqrt(n)``, ``ddof = 1``; 0 for one run)
    along ``axis``."""
    values = np.asarray(values, dtype=float)
    n = values.shape[axis]
    error = (
        values.std(axis=axis, ddof=1) / np.sqrt(n)
        if n > 1
        else np.zeros_like(values.mean(axis=axis))
    )
    return values.mean(axis=axis), error


def _finished(store: ResultStore, sweep: str) -> list[dict[str, Any]]:
    return [r for r in store.runs(sweep) if r["status"] == "finished"]


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
    y_range: tuple[float, float] | None = None,
) -> list[Path]:
    """Best (left) and final (right) test accuracy against the label ``x``, one line per
    value of ``lines`` and variant (:func:`versus_series`); returns the PNG and SVG paths.
    ``y_range`` zooms the accuracy axis; means below it are marked ▼ on its lower edge."""
    plt = _pyplot()
    series, baselines = versus_series(_finished(store, sweep), x, lines)
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
    return _save(fig, Path(path))


def curve_label(group: str, runs: int, unfinished: int) -> str:
    """A curve's legend entry, which says how many of its runs are unfinished.

    Examples:
        >>> curve_label("pla", 3, 0), curve_label("pla", 3, 1), curve_label("pla", 1, 1)
        ('pla', 'pla (1 of 3 runs unfinished)', 'pla (unfinished)')
    """
    if not unfinished:
        return group
    if unfinished == runs:
        return f"{group} (unfinished)"
    return f"{group} ({unfinished} of {runs} runs unfinished)"


def plot_store_curves(store: ResultStore, sweep: str, path: str | Path) -> list[Path]:
    """Training loss (log scale) and test accuracy per epoch, one line per group of runs
    (mean over seeds, up to the group's shortest run); a group with unfinished runs says
    so in the legend. Returns the PNG and SVG paths."""
    plt = _pyplot()
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
    return _save(fig, Path(path))


def plot_sweep(
    store: ResultStore, sweep: str, plots: list[dict[str, Any]], out_dir: str | Path
) -> list[Path]:
    """Every figure a sweep asks for (its ``plots`` entries); PNG paths returned."""
    made = []
    for spec in plots:
        if spec["kind"] == "versus":
            stem = safe_name(f"{sweep}-versus-{spec['x']}")
            files = plot_versus(
                store,
                sweep,
                spec["x"],
                spec.get("lines"),
                Path(out_dir) / stem,
                log_x=spec.get("log_x", True),
                y_range=spec.get("y_range"),
            )
        else:
            files = plot_store_curves(store, sweep, Path(out_dir) / safe_name(f"{sweep}-curves"))
        made.append(files[0])
    return made
