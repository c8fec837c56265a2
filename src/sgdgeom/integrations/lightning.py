"""PyTorch Lightning callbacks: layer temperatures (Musso eq. 2) and snapshots of the
diffusion spectrum (Fioresi et al., F2–F3) during ``Trainer.fit``.

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
            return DiffusionMetricSGD(self.net, lr=0.05, fused=False)

    callbacks = [LayerTemperatures(module="net"), DiffusionSpectrum(probe=(x, y), module="net")]
    pl.Trainer(max_epochs=5, callbacks=callbacks).fit(Classifier(net), loader)

Each callback logs its numbers with ``pl_module.log_dict`` (to whatever logger the Trainer
has) and keeps them in ``history``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.extras import require
from sgdgeom.monitor import LayerTemperature
from sgdgeom.persample import LossSpec

pl = require("lightning.pytorch", "sgdgeom.integrations.lightning")

__all__ = ["DiffusionSpectrum", "LayerTemperatures"]


def _network(pl_module: nn.Module, module: str | None) -> nn.Module:
    return pl_module.get_submodule(module) if module else pl_module


class LayerTemperatures(pl.Callback):
    """:class:`~sgdgeom.monitor.LayerTemperature` in a Lightning ``Trainer``: records the
    weight gradients after every backward and logs ``temp/I/signal``, ``temp/I/noise``
    (and, with ``snr``, ``snr/I/...``) at the end of each training epoch.

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


class DiffusionSpectrum(pl.Callback):
    """Every ``every`` training epochs, the diffusion matrix D of ``loss_fn`` on a fixed
    probe batch: ``λ_max``, ``tr D``, the effective rank, and the ``k`` largest eigenvalues
    (all N of them with ``k=None``, through the N × N Gram matrix; else Lanczos).

    The network is measured in eval mode (dropout off, BatchNorm on its running
    statistics, as a per-sample computation needs), then put back in its mode.
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
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        self.probe = probe
        self.every = every
        self.k = k
        self.loss_fn = loss_fn
        self.module = module
        self.history: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every:
            return
        network = _network(pl_module, self.module)
        first = next(p for p in network.parameters() if p.requires_grad)
        x, y = (t.to(first.device) for t in self.probe)
        training = network.training
        network.eval()
        try:
            D = DiffusionMatrix(network, self.loss_fn, (x.to(first.dtype), y))
            values = D.eigvalsh() if self.k is None else D.eigsh(self.k).values
            snapshot = {
                "spectrum/lambda_max": float(values[0]),
                "spectrum/trace": D.trace(),
                "spectrum/effective_rank": D.effective_rank(),
            }
        finally:
            network.train(training)
        self.history.append({"epoch": epoch, **snapshot, "eigenvalues": values.tolist()})
        pl_module.log_dict(snapshot)
