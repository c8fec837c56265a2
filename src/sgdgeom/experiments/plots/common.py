"""What every sweep figure shares: matplotlib without a display, PNG and SVG written
atomically, groups of runs named by their labels, and means with their standard errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import save_figure

__all__ = [
    "curve_label",
    "finish_png",
    "layer_bars",
    "finished_runs",
    "group_label",
    "mean_and_error",
    "pyplot",
    "save_png_svg",
]

_IGNORED_LABELS = ("seed",)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png_svg(fig: Any, path: Path) -> list[Path]:
    """Save as ``path.png`` and ``path.svg`` (``path`` is a stem; dots in it are kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.parent / f"{path.name}.{suffix}" for suffix in ("png", "svg")]
    for target in out:
        save_figure(fig, target, dpi=120)
    pyplot().close(fig)
    return out


def finish_png(fig: Any, path: str | Path) -> Path:
    """Lay the figure out, save it as the PNG ``path`` (atomically) and close it."""
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=120)
    pyplot().close(fig)
    return path


def layer_bars(ax: Any, values: dict[str, float], color: str, ylabel: str, title: str) -> None:
    """One bar per layer on a log scale (a value that is not a positive number is left
    out: a log scale has no place for it)."""
    shown = [v if np.isfinite(v) and v > 0 else np.nan for v in values.values()]
    ax.bar(list(values), shown, color=color)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


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


def finished_runs(store: ResultStore, sweep: str) -> list[dict[str, Any]]:
    return [r for r in store.runs(sweep) if r["status"] == "finished"]


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
