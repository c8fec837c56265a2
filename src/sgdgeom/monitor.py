"""Moved to :mod:`sgdgeom.monitors` (this module is kept for one release)."""

from sgdgeom._deprecated import moved

__getattr__ = moved(
    "sgdgeom.monitor",
    {
        "LayerTemperature": "sgdgeom.monitors",
        "l1_norms": "sgdgeom.monitors.temperature",
        "analyse_regimes": "sgdgeom.monitors.regimes",
        "temperature_curves": "sgdgeom.monitors.regimes",
        "plot_temperatures": "sgdgeom.experiments.plots.temperatures",
    },
)
