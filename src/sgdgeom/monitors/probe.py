"""The base of the monitors that measure every few epochs on a fixed probe batch.

A *probe measurement* takes the model as it is at the end of an epoch and computes
something over a fixed batch ``(x, y)``: the layer traces of D, its alignment with the
Hessian, the steady-state current, D's spectrum. Every such measurement shares the same
rules, kept here once:

- every ``every`` epochs (epoch numbers divisible by it);
- on the probe batch, moved to the model's device and floating dtype;
- with the model in eval mode (BatchNorm on its running statistics and no dropout, as a
  per-sample computation needs), put back in its mode afterwards, even after an error.

A subclass implements :meth:`ProbeMonitor.measure`; it works in
:class:`~sgdgeom.train.Trainer`, in a Lightning callback, or by hand
(:meth:`ProbeMonitor.measure_now`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.errors import InputError
from sgdgeom.persample import LossSpec

__all__ = ["ProbeMonitor", "evaluation", "probe_on"]


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode within the block, in its own mode again after it."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def probe_on(model: nn.Module, probe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The probe batch on the model's device, its inputs in the model's floating dtype
    (integer inputs, token ids, are kept)."""
    first = next(p for p in model.parameters() if p.requires_grad)
    x, y = probe
    x = x.to(first.device, first.dtype) if x.is_floating_point() else x.to(first.device)
    return x, y.to(first.device)


class ProbeMonitor(Callback):
    """Measures every ``every`` epochs on a fixed probe batch (see the module doc).

    Args:
        probe: the batch ``(x, y)``, already normalised.
        loss_fn: its per-sample loss (see :func:`~sgdgeom.persample.per_sample_loss`).
        every: epochs between measurements (>= 1).
    """

    def __init__(
        self, probe: tuple[Tensor, Tensor], loss_fn: LossSpec = "cross_entropy", every: int = 1
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise InputError(f"every must be an integer >= 1, got {every!r}")
        self.probe, self.loss_fn, self.every = probe, loss_fn, every

    def measure(
        self, model: nn.Module, data: tuple[Tensor, Tensor], trainer: Loop | None
    ) -> dict[str, float]:
        """The metrics at the model's current parameters (in eval mode, ``data`` the probe
        on its device); ``trainer`` is the loop, where there is one."""
        raise NotImplementedError

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (counted from 1) is measured."""
        return epoch % self.every == 0

    def measure_now(self, model: nn.Module, trainer: Loop | None = None) -> dict[str, float]:
        """:meth:`measure` under the rules of the module doc, whatever the epoch."""
        with evaluation(model):
            return self.measure(model, probe_on(model, self.probe), trainer)

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        if self.due(epoch):
            metrics.update(self.measure_now(trainer.model, trainer))
