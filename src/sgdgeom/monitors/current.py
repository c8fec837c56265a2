r"""The steady-state instruments of Fioresi et al. (F11–F12) along training.

Every ``every`` epochs, on a fixed probe batch, :class:`CurrentMonitor` measures

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

from pydantic import Field
from torch import Tensor, nn

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import EpsilonLike
from sgdgeom.errors import InputError
from sgdgeom.geometry import curl, current
from sgdgeom.monitors.probe import ProbeMonitor
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor
from sgdgeom.persample import LossSpec

__all__ = ["CurrentMonitor", "CurrentOptions"]


class CurrentMonitor(ProbeMonitor):
    """Records (F12)'s current and the curl of ``∇_D f`` during training (module doc).

    Args:
        probe: a fixed batch ``(x, y)`` (already normalised). Its size sets the cost: the
            curl materialises its ``(N, d)`` per-sample gradients.
        loss_fn: the per-sample loss (the run's base loss).
        every: epochs between measurements (>= 1).
        eps: the metric's ε: ``"auto"`` (half of ``1/λ_max`` at each measurement), a
            number or an :class:`~sgdgeom.epsilon.Epsilon`.
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
        eps: EpsilonLike = "auto",
        probes: int | None = 8,
        sections: int = 4,
        beta: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(probe, loss_fn, every)
        if sections < 0:
            raise InputError(f"sections must be >= 0, got {sections}")
        if beta is not None and not beta > 0:
            raise InputError(f"beta must be > 0, got {beta}")
        self.eps, self.probes, self.sections = eps, probes, sections
        self.beta, self.seed = beta, seed

    def measure(
        self, model: nn.Module, data: tuple[Tensor, Tensor], trainer: Loop | None
    ) -> dict[str, float]:
        beta = self.beta
        if beta is None:
            if trainer is None:
                raise InputError("CurrentMonitor needs beta outside a Trainer (2 b / lr of SGD)")
            beta = 2 * trainer.batch_size / trainer.optimizer.param_groups[0]["lr"]
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
        return metrics


@register_monitor("current")
class CurrentOptions(MonitorOptions):
    """:class:`CurrentMonitor` in a config: ``every`` epochs, ``probes`` Hutchinson probes
    for ∇·D (null: exact) and ``sections`` random sections for the curl."""

    every: int = Field(1, ge=1)
    probes: int | None = Field(8, ge=2, le=4096)  # each probe is a pass over the probe batch
    sections: int = Field(4, ge=0)

    def build(self, context: MonitorContext) -> Callback:
        return CurrentMonitor(
            context.probe,
            context.loss_fn,
            every=self.every,
            probes=self.probes,
            sections=self.sections,
            seed=context.seed,
        )
