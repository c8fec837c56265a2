"""Every numeric metric of each epoch as a TensorBoard scalar."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.errors import ConfigError
from sgdgeom.extras import require
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor

__all__ = ["TensorBoardLogger", "TensorBoardOptions"]


class TensorBoardLogger(Callback):
    """Writes every numeric metric of each epoch as a TensorBoard scalar (needs the
    ``tensorboard`` package; the JSON-lines metrics are written regardless). Put it after
    the monitors whose metrics it should see."""

    def __init__(self, log_dir: str | Path) -> None:
        tensorboard = require("torch.utils.tensorboard", "TensorBoard output")
        self.writer = tensorboard.SummaryWriter(str(log_dir))

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()


@register_monitor("tensorboard")
class TensorBoardOptions(MonitorOptions):
    """:class:`TensorBoardLogger` in a config (``tensorboard: true``), writing to the run
    folder's ``tensorboard/``; built after the other monitors, whose metrics it writes."""

    reads_metrics: ClassVar[bool] = True

    def build(self, context: MonitorContext) -> Callback:
        if context.out_dir is None:
            raise ConfigError("monitor.tensorboard needs a run directory (--out)")
        return TensorBoardLogger(context.out_dir / "tensorboard")
