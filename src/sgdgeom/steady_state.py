r"""The steady-state instruments of Fioresi et al. (F11–F12) along training: a
:class:`~sgdgeom.train.Trainer` callback.

Every ``every`` epochs, on a fixed probe batch, :class:`SteadyStateMonitor` measures

- ``current/ratio``: :math:`\|(\varepsilon/\beta)\nabla\cdot D\| / \|\nabla f\|`, what (F12)
  needs to be small for its current :math:`j` to vanish (:func:`~sgdgeom.geometry.current`);
- ``current/divergence_term`` and ``current/gradient``: the two norms;
- ``current/j``: :math:`\|j\|` with the exact metric gradient, :math:`= (\varepsilon/\beta)
  \|\nabla\cdot D\|`;
- ``current/curl``: the largest relative curl of :math:`\nabla_D f` over random 2-D
  sections (:func:`~sgdgeom.geometry.curl`): zero where the potential Φ of (F11) exists.

β is SGD's inverse temperature :math:`2b/\eta` (Chaudhari & Soatto), from the trainer's
batch size and the optimizer's learning rate unless given.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.geometry import curl, current
from sgdgeom.persample import LossSpec
from sgdgeom.train import Callback, Trainer

__all__ = ["SteadyStateMonitor"]


class SteadyStateMonitor(Callback):
    """Records (F12)'s current and the curl of ``∇_D f`` during training (module doc).

    Args:
        probe: a fixed batch ``(x, y)`` (already normalised). Its size sets the cost: the
            curl materialises its ``(N, d)`` per-sample gradients.
        loss_fn: the per-sample loss (the run's base loss).
        every: epochs between measurements (>= 1).
        eps: the metric's ε, ``"auto"`` (half of ``1/λ_max`` at each measurement) or a
            number.
        probes: Hutchinson probes for ``∇·D`` (None: exact, d second-derivative passes).
        sections: random 2-D sections for the curl (0: no curl).
        beta: SGD's inverse temperature; None: ``2 · batch_size / lr`` from the trainer.
        seed: the random source of the probes and sections.
    """

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        loss_fn: LossSpec = "cross_entropy",
        *,
        every: int = 1,
        eps: float | str = "auto",
        probes: int | None = 8,
        sections: int = 4,
        beta: float | None = None,
        seed: int = 0,
    ) -> None:
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        if sections < 0:
            raise InputError(f"sections must be >= 0, got {sections}")
        if beta is not None and not beta > 0:
            raise InputError(f"beta must be > 0, got {beta}")
        self.probe, self.loss_fn = probe, loss_fn
        self.every, self.eps, self.probes, self.sections = every, eps, probes, sections
        self.beta, self.seed = beta, seed

    def measure(self, model: nn.Module, beta: float) -> dict[str, float]:
        """The instruments at the model's current parameters."""
        was_training = model.training
        model.eval()  # BatchNorm: the per-sample losses of the probe, with running statistics
        try:
            device = next(model.parameters()).device
            data = (self.probe[0].to(device), self.probe[1].to(device))
            D = DiffusionMatrix(model, self.loss_fn, data, route="generic", chunk_size=None)
            result = current(D, beta, self.eps, probes=self.probes, seed=self.seed)
            metrics = {
                "current/ratio": result.ratio,
                "current/divergence_term": float(result.divergence_term.norm()),
                "current/gradient": float(D.mean_gradient().norm()),
                "current/j": float(result.j.norm()),
                "current/eps": result.eps,
                "current/beta": beta,
            }
            if self.sections:
                sections = curl(
                    model, self.loss_fn, data, result.eps, sections=self.sections, seed=self.seed
                )
                metrics["current/curl"] = float(sections.relative.max())
        finally:
            model.train(was_training)
        return metrics

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch % self.every:
            return
        beta = self.beta
        if beta is None:
            beta = 2 * trainer.batch_size / trainer.optimizer.param_groups[0]["lr"]
        metrics.update(self.measure(trainer.model, beta))
