"""Moved to :mod:`sgdgeom.monitors` (this module is kept for one release)."""

from sgdgeom._deprecated import moved

__getattr__ = moved(
    "sgdgeom.steady_state", {"SteadyStateMonitor": "sgdgeom.monitors:CurrentMonitor"}
)
