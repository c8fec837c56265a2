"""Snapshots of the diffusion spectrum along training (Fioresi et al., F2–F3)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.monitors.probe import ProbeMonitor
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor
from sgdgeom.persample import LossSpec

__all__ = ["SpectrumMonitor", "SpectrumOptions"]


class SpectrumMonitor(ProbeMonitor):
    """Every ``every`` epochs, the diffusion matrix D of ``loss_fn`` on a fixed probe batch:
    ``spectrum/lambda_max``, ``spectrum/trace`` and ``spectrum/effective_rank``; the ``k``
    largest eigenvalues (all N of them with ``k=None``, through the N × N Gram matrix; else
    block Lanczos) are kept in :attr:`history` with the epoch."""

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        loss_fn: LossSpec = "cross_entropy",
        *,
        every: int = 1,
        k: int | None = None,
    ) -> None:
        super().__init__(probe, loss_fn, every)
        self.k = k
        self.history: list[dict[str, object]] = []

    def measure(
        self, model: nn.Module, data: tuple[Tensor, Tensor], trainer: Loop | None
    ) -> dict[str, float]:
        D = DiffusionMatrix(model, self.loss_fn, data)
        values = D.eigvalsh() if self.k is None else D.eigsh(self.k).values
        snapshot = {
            "spectrum/lambda_max": float(values[0]),
            "spectrum/trace": D.trace(),
            "spectrum/effective_rank": D.effective_rank() if self.k is None else float("nan"),
        }
        epoch = trainer.epoch if trainer is not None else len(self.history) + 1
        self.history.append({"epoch": epoch, **snapshot, "eigenvalues": values.tolist()})
        return snapshot


@register_monitor("spectrum")
class SpectrumOptions(MonitorOptions):
    """:class:`SpectrumMonitor` in a config: ``every`` epochs, the top ``k`` (null: all)."""

    every: int = Field(1, ge=1)
    k: int | None = Field(None, ge=1)

    def build(self, context: MonitorContext) -> Callback:
        return SpectrumMonitor(context.probe, context.loss_fn, every=self.every, k=self.k)
