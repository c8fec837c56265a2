"""PyTorch Lightning callbacks: layer temperatures (Musso eq. 2), the gradient noise scale
(McCandlish et al. 2018) and snapshots of the diffusion spectrum (Fioresi et al., F2–F3)
during ``Trainer.fit``.

Needs the ``lightning`` extra (``pip install 'sgdgeom[lightning]'``). sgdgeom's optimizers
are ``torch.optim`` optimizers, so a LightningModule returns them from
``configure_optimizers`` as any other::

    import lightning.pytorch as pl
    from sgdgeom import DiffusionMetricSGD
    from sgdgeom.integrations.lightning import DiffusionSpectrum, LayerTemperatures

    class Classifier(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return DiffusionMetricSGD(self.net, lr=0.05, fused="off")

    callbacks = [LayerTemperatures(module="net"), DiffusionSpectrum(probe=(x, y), module="net")]
    pl.Trainer(max_epochs=5, callbacks=callbacks).fit(Classifier(net), loader)

Each callback wraps one of sgdgeom's monitors (:mod:`sgdgeom.monitors`), logs its numbers
with ``pl_module.log_dict`` (to whatever logger the Trainer has) and keeps them in
``history``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sgdgeom.extras import require
from sgdgeom.monitors import LayerTemperature, NoiseScale, SpectrumMonitor
from sgdgeom.monitors.noise_scale import Estimator
from sgdgeom.persample import LossSpec

pl = require("lightning.pytorch", "sgdgeom.integrations.lightning")

__all__ = ["DiffusionSpectrum", "LayerTemperatures", "NoiseScales"]


def _network(pl_module: nn.Module, module: str | None) -> nn.Module:
    return pl_module.get_submodule(module) if module else pl_module


class LayerTemperatures(pl.Callback):  # type: ignore[name-defined]
    """:class:`~sgdgeom.monitors.LayerTemperature` in a Lightning ``Trainer``: records the
    weight gradients after every backward and logs ``temperature/I/signal``,
    ``temperature/I/noise`` (and, with ``snr``, ``snr/I/...``) at the end of each training
    epoch.

    Args:
        layers: the layers to monitor (default: every layer with weights).
        snr: also log the gradient signal-to-noise norms.
        trace_every: epochs between ``tr D_I / N_I`` measurements on ``probe``.
        probe: a fixed batch ``(x, y)`` for the traces.
        loss_fn: the per-sample loss of the traces.
        module: the attribute path of the network inside the LightningModule (``"net"``);
            None monitors the LightningModule itself.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        snr: bool = False,
        trace_every: int = 0,
        probe: tuple[Tensor, Tensor] | None = None,
        loss_fn: LossSpec = "cross_entropy",
        module: str | None = None,
    ) -> None:
        self.monitor = LayerTemperature(
            layers, snr=snr, trace_every=trace_every, probe=probe, loss_fn=loss_fn
        )
        self.module = module
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self.monitor.attach(_network(pl_module, self.module))

    def on_after_backward(self, trainer: Any, pl_module: nn.Module) -> None:
        self.monitor.record()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = self.monitor.epoch_metrics(trainer.current_epoch + 1)
        self.history.append({"epoch": trainer.current_epoch + 1, **metrics})
        pl_module.log_dict(metrics)


class DiffusionSpectrum(pl.Callback):  # type: ignore[name-defined]
    """:class:`~sgdgeom.monitors.SpectrumMonitor` in a Lightning ``Trainer``: every
    ``every`` training epochs, the diffusion matrix D of ``loss_fn`` on a fixed probe batch:
    ``λ_max``, ``tr D``, the effective rank, and the ``k`` largest eigenvalues (all N of them
    with ``k=None``, through the N × N Gram matrix; else Lanczos). The network is measured in
    eval mode, then put back in its mode (:class:`~sgdgeom.monitors.ProbeMonitor`).
    """

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        *,
        every: int = 1,
        k: int | None = None,
        loss_fn: LossSpec = "cross_entropy",
        module: str | None = None,
    ) -> None:
        self.monitor = SpectrumMonitor(probe, loss_fn, every=every, k=k)
        self.module = module

    @property
    def history(self) -> list[dict[str, Any]]:
        """One snapshot per measurement: the epoch, the logged numbers, the eigenvalues."""
        return self.monitor.history

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if not self.monitor.due(epoch):
            return
        snapshot = self.monitor.measure_now(_network(pl_module, self.module))
        self.monitor.history[-1]["epoch"] = epoch
        pl_module.log_dict(snapshot)


class NoiseScales(pl.Callback):  # type: ignore[name-defined]
    """:class:`~sgdgeom.monitors.NoiseScale` in a Lightning ``Trainer``: after every
    ``every``-th backward, ``tr Σ``, ``‖G‖²`` and ``B_noise`` of the batch, in total and
    per layer (logged as ``noise/...`` at that step), and their smoothed values at the end
    of each training epoch. Under DDP (Lightning's ``strategy="ddp"``) the cross-process
    estimator serves.

    Args:
        every: steps between measurements.
        decay: the moving averages' ``β``.
        estimator: ``"auto"``, ``"batch"`` or ``"processes"``.
        layers: the layers whose own numbers are logged (default: all).
        module: the attribute path of the network inside the LightningModule.
    """

    def __init__(
        self,
        *,
        every: int = 1,
        decay: float = 0.99,
        estimator: Estimator = "auto",
        layers: list[str] | None = None,
        module: str | None = None,
    ) -> None:
        self.monitor = NoiseScale(every=every, decay=decay, estimator=estimator, layers=layers)
        self.module = module

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per measurement."""
        return self.monitor.history

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self.monitor.attach(_network(pl_module, self.module))

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        record = self.monitor.record()
        if record is not None:
            pl_module.log_dict({k: v for k, v in record.items() if k.startswith("noise/")})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pl_module.log_dict(self.monitor.epoch_metrics(trainer.current_epoch + 1))
