"""The alignment of the diffusion matrix with the Hessian, recorded along training
(:mod:`sgdgeom.alignment`)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from sgdgeom.alignment import alignment
from sgdgeom.callbacks import Callback, Loop
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.hessian import HessianOperator
from sgdgeom.monitors.probe import ProbeMonitor
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor
from sgdgeom.persample import LossSpec

__all__ = ["AlignmentMonitor", "AlignmentOptions"]


class AlignmentMonitor(ProbeMonitor):
    """Records the alignment of D with H on a fixed probe batch every ``every`` epochs:
    ``alignment/cosine`` (and ``_stderr``), ``alignment/cosine_topk``,
    ``alignment/overlap``, ``alignment/rayleigh_top`` (``v_1ᵀ D v_1 / λ_max(D)``),
    ``alignment/d_top`` and ``alignment/h_top`` (λ_max of D and of H), on the top ``k``
    eigenpairs of each and ``probes`` Hutchinson probes (None: exact)."""

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        loss_fn: LossSpec = "cross_entropy",
        *,
        every: int = 1,
        k: int = 5,
        probes: int | None = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(probe, loss_fn, every)
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        self.k, self.probes, self.seed = k, probes, seed

    def measure(
        self, model: nn.Module, data: tuple[Tensor, Tensor], trainer: Loop | None
    ) -> dict[str, float]:
        D = DiffusionMatrix(model, self.loss_fn, data, chunk_size=None)
        H = HessianOperator(model, self.loss_fn, data, chunk_size=None)
        result = alignment(D, H, self.k, probes=self.probes, seed=self.seed)
        top = float(result.d_values[0])
        return {
            "alignment/cosine": result.cosine,
            "alignment/cosine_stderr": result.cosine_stderr or 0.0,
            "alignment/cosine_topk": result.cosine_topk,
            "alignment/overlap": result.overlap,
            "alignment/rayleigh_top": float(result.rayleigh[0]) / top if top > 0 else 0.0,
            "alignment/d_top": top,
            "alignment/h_top": float(result.h_values[0]),
        }


@register_monitor("alignment")
class AlignmentOptions(MonitorOptions):
    """:class:`AlignmentMonitor` in a config: ``every`` epochs, on the top ``k``."""

    every: int = Field(1, ge=1)
    k: int = Field(5, ge=1)

    def build(self, context: MonitorContext) -> Callback:
        return AlignmentMonitor(
            context.probe, context.loss_fn, every=self.every, k=self.k, seed=context.seed
        )
