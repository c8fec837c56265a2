"""The figures a sweep can ask for: each a :class:`PlotOptions` model that draws itself from
the result store alone, so that any sweep (finished, partial or merged from several
machines) can be plotted again without rerunning it.

A sweep config's ``plots:`` entries are validated as the options model registered under
their ``kind``. Adding a plot kind is one module with its options model (and its
:meth:`PlotOptions.draw`) under ``@register_plot("kind")``, imported by
:mod:`sgdgeom.experiments.plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sgdgeom.experiments.store import ResultStore
from sgdgeom.registry import Options, Registry, validate_named

__all__ = ["PLOTS", "PlotOptions", "plot_options", "plot_sweep", "register_plot"]


class PlotOptions(Options):
    """The options of one figure of a sweep; a registered subclass declares them."""

    kind: str

    def labels(self) -> set[str]:
        """The run labels the figure needs (a sweep whose runs lack one is refused)."""
        return set()

    def draw(self, store: ResultStore, sweep: str, out_dir: Path) -> list[Path]:
        """Draw the figure of ``sweep`` into ``out_dir``; the files written, PNG first."""
        raise NotImplementedError


PLOTS: Registry[type[PlotOptions]] = Registry("plot kind")
"""Plot kinds to their options models."""

OptionsType = TypeVar("OptionsType", bound=type[PlotOptions])


def register_plot(kind: str) -> Callable[[OptionsType], OptionsType]:
    """Class decorator: the options model of the figure a sweep names ``kind``."""
    return PLOTS.decorator(kind)


def plot_options(data: Any) -> PlotOptions:
    """One ``plots:`` entry as its registered options model."""
    return validate_named(PLOTS, data, key="kind", base=PlotOptions)


def plot_sweep(
    store: ResultStore, sweep: str, plots: Sequence[PlotOptions | dict[str, Any]], out_dir: Path
) -> list[Path]:
    """Every figure a sweep asks for (its ``plots`` entries, as options or as the dicts the
    store keeps); the PNG of each returned."""
    return [plot_options(spec).draw(store, sweep, Path(out_dir))[0] for spec in plots]
