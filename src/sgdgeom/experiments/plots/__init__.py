"""Figures made from data alone: a sweep's from its result store, a run's from its files.

- :mod:`~sgdgeom.experiments.plots.registry`: the plot kinds a sweep config can name
  (:data:`PLOTS`) and :func:`plot_sweep`;
- :mod:`~sgdgeom.experiments.plots.versus` and :mod:`~sgdgeom.experiments.plots.curves`:
  the two kinds;
- :mod:`~sgdgeom.experiments.plots.temperatures`: Musso's Fig. 1 of one run;
- :mod:`~sgdgeom.experiments.plots.common`: what they share.

Importing this package registers every built-in plot kind: one import line per module.
"""

from sgdgeom.experiments.plots.common import curve_label, group_label, mean_and_error
from sgdgeom.experiments.plots.curves import plot_store_curves
from sgdgeom.experiments.plots.registry import (
    PLOTS,
    PlotOptions,
    plot_options,
    plot_sweep,
    register_plot,
)
from sgdgeom.experiments.plots.temperatures import plot_temperatures
from sgdgeom.experiments.plots.versus import plot_versus, versus_series

__all__ = [
    "PLOTS",
    "PlotOptions",
    "curve_label",
    "group_label",
    "mean_and_error",
    "plot_options",
    "plot_store_curves",
    "plot_sweep",
    "plot_temperatures",
    "plot_versus",
    "register_plot",
    "versus_series",
]
