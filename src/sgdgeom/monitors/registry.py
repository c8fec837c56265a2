"""The monitors a config can switch on: each a :class:`MonitorOptions` model that builds its
callback.

A config's ``monitor:`` section names monitors by their registered names, each with its
options (``true`` for the defaults), beside the shared ``probe_size``::

    monitor:
      probe_size: 1024
      temperature: {snr: true, trace_every: 50}
      alignment: {every: 10, k: 5}

:meth:`MonitorOptions.build` makes the callback from a :class:`MonitorContext` (the probe
batch, the run's loss, seed and folder). Adding a monitor is one module with its callback,
its options model and ``@register_monitor("name")``, imported by :mod:`sgdgeom.monitors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from torch import Tensor

from sgdgeom.callbacks import Callback
from sgdgeom.persample import LossSpec
from sgdgeom.registry import Options, Registry

__all__ = ["MONITORS", "MonitorContext", "MonitorOptions", "register_monitor"]


@dataclass(frozen=True)
class MonitorContext:
    """What a monitor is built with: the probe batch ``(x, y)`` (the first ``probe_size``
    training samples, normalised), the per-sample loss, the run's seed and its folder
    (None when nothing is written)."""

    probe: tuple[Tensor, Tensor]
    loss_fn: LossSpec
    seed: int
    out_dir: Path | None


class MonitorOptions(Options):
    """The options of one monitor; a registered subclass declares them."""

    #: whether the monitor reads the weights' ``.grad`` after backward (an optimizer that
    #: fuses the weight gradients away must then leave them)
    reads_grad: ClassVar[bool] = False
    #: whether it reads the other monitors' metrics of the epoch (it is then built last)
    reads_metrics: ClassVar[bool] = False
    #: the experiment kind (one taking ``run_dir``) that reports on a finished run with this
    #: monitor, from its files; the runner runs it at the end of the run
    report: ClassVar[str | None] = None

    def build(self, context: MonitorContext) -> Callback:
        """The callback."""
        raise NotImplementedError


MONITORS: Registry[type[MonitorOptions]] = Registry("monitor")
"""Monitor names to their options models."""

OptionsType = TypeVar("OptionsType", bound=type[MonitorOptions])


def register_monitor(name: str) -> Callable[[OptionsType], OptionsType]:
    """Class decorator: the options model of the monitor a config names ``name``."""
    return MONITORS.decorator(name)
