"""Monitors: instruments recorded along training, each a callback of
:mod:`sgdgeom.callbacks` in a module of its own, and each a name a config can switch on
(:data:`MONITORS`).

- :mod:`~sgdgeom.monitors.temperature`: Musso's layer temperatures (M2, Fig. 1);
- :mod:`~sgdgeom.monitors.noise_scale`: the gradient noise scale and the critical batch
  size, per layer (McCandlish et al. 2018);
- :mod:`~sgdgeom.monitors.alignment`: the alignment of D with the Hessian;
- :mod:`~sgdgeom.monitors.current`: the current and curl of Fioresi et al. (F11, F12);
- :mod:`~sgdgeom.monitors.spectrum`: snapshots of D's spectrum;
- :mod:`~sgdgeom.monitors.tensorboard`: every metric as a TensorBoard scalar;
- :mod:`~sgdgeom.monitors.probe`: the base of the measurements on a probe batch;
- :mod:`~sgdgeom.monitors.regimes`: Fig. 1's regimes in recorded temperatures.

Importing this package registers every built-in monitor: one import line per module.
"""

from sgdgeom.monitors.alignment import AlignmentMonitor
from sgdgeom.monitors.current import CurrentMonitor
from sgdgeom.monitors.noise_scale import NoiseScale
from sgdgeom.monitors.probe import ProbeMonitor
from sgdgeom.monitors.registry import MONITORS, MonitorContext, MonitorOptions, register_monitor
from sgdgeom.monitors.spectrum import SpectrumMonitor
from sgdgeom.monitors.temperature import LayerTemperature
from sgdgeom.monitors.tensorboard import TensorBoardLogger

__all__ = [
    # the monitors
    "AlignmentMonitor",
    "CurrentMonitor",
    "LayerTemperature",
    "NoiseScale",
    "SpectrumMonitor",
    "TensorBoardLogger",
    # building blocks and the registry
    "MONITORS",
    "MonitorContext",
    "MonitorOptions",
    "ProbeMonitor",
    "register_monitor",
]
