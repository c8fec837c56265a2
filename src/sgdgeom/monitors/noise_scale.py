r"""The gradient noise scale during training, per layer (McCandlish et al. 2018).

:class:`NoiseScale` reads, after a step's backward, the per-sample squared gradient norms
of the step's batch from the layer rules' captures (ghost norms where a rule has them: a
Linear on non-sequence inputs needs ``‖x_i‖² ‖δ_i‖²`` only) and the batch gradient from
``.grad``, and estimates ``tr Σ``, ``‖G‖²`` and ``B_noise`` without bias
(:mod:`sgdgeom.noise`), in total and for every layer. Under ``torch.distributed`` it takes
the cross-process estimator by default: the local gradients of the processes against the
all-reduced one, which needs no per-sample work beyond one weight-gradient-sized product
per layer. Numerator and denominator are smoothed separately (exponential moving averages,
:class:`~sgdgeom.noise.RatioOfAverages`), and the predicted trade-off at the batch size in
use is reported beside them: ``S/S_min = 1 + B_noise/B``, ``E/E_min = 1 + B/B_noise``.

In a plain loop, :meth:`NoiseScale.record` after the backward (after all of a step's
micro-batches under gradient accumulation); in :class:`~sgdgeom.train.Trainer`,
``monitor: {noise_scale: {every: 10}}``; in Lightning,
:class:`~sgdgeom.integrations.lightning.NoiseScales`. Steps between measurements record
nothing (the hooks are off for their forwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.errors import InputError
from sgdgeom.files import read_jsonl, write_jsonl
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor
from sgdgeom.monitors.temperature import LayerTemperature
from sgdgeom.noise import (
    NoiseEstimate,
    RatioOfAverages,
    batch_estimate,
    cross_process_estimate,
    examples_ratio,
    layer_groups,
    noise_scale,
    steps_ratio,
)
from sgdgeom.params import ParamSpace
from sgdgeom.persample import LossReduction, StepCapture, distributed
from sgdgeom.precision import compute_dtype, full_precision

__all__ = ["Estimator", "NoiseScale", "NoiseScaleOptions"]

Estimator = Literal["auto", "batch", "processes"]
"""Which unbiased estimator: within the batch, across processes, or ``"auto"`` (across
processes under ``torch.distributed``, else within the batch)."""

_HINT = "the noise scale needs exact per-sample norms: use the generic route (noise.dataset_noise)"


class NoiseScale(Callback):
    """Records ``tr Σ``, ``‖G‖²`` and ``B_noise`` every ``every`` steps (see the module doc).

    Args:
        model: the model to monitor now (else: the Trainer's, when training begins).
        every: steps between measurements (1: every step).
        decay: the moving averages' ``β`` in (0, 1).
        estimator: see :data:`Estimator`.
        layers: the layers whose own numbers are kept (default: all); the totals are over
            every parameter.
        loss_reduction: ``"mean"`` (the loss is the mean of the per-sample losses, as
            PyTorch's losses by default) or ``"sum"``.
        temperature: record the layer temperatures too (:class:`LayerTemperature`), so
            that both views of the noise sit in one epoch record.
        log: a JSON-lines file that gets one record per measurement (written atomically
            at the end of each epoch and by :meth:`flush`).

    After each measurement, :attr:`last` holds its metrics; :meth:`epoch_metrics` gives the
    smoothed values at the end of an epoch.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        every: int = 1,
        decay: float = 0.99,
        estimator: Estimator = "auto",
        layers: Sequence[str] | None = None,
        loss_reduction: LossReduction = "mean",
        temperature: bool = False,
        log: str | Path | None = None,
    ) -> None:
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        if estimator not in ("auto", "batch", "processes"):
            raise InputError(f"estimator must be auto, batch or processes, got {estimator!r}")
        RatioOfAverages(decay)  # checks the decay
        self.every, self.decay, self.estimator = every, decay, estimator
        self.layer_names = list(layers) if layers is not None else None
        self.loss_reduction = loss_reduction
        self.temperature = LayerTemperature(self.layer_names) if temperature else None
        self.log = Path(log) if log is not None else None
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self.steps = 0
        self._capture: StepCapture | None = None
        self._smoothed: dict[str, RatioOfAverages] = {}
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------ setting up

    def attach(self, model: nn.Module) -> None:
        """Monitor ``model`` from now on (hooks on the owner module of every parameter)."""
        self.detach()
        self.model = model
        self._capture = StepCapture(model, loss_reduction=self.loss_reduction, hint=_HINT)
        space = ParamSpace(model)
        groups = layer_groups(space.names)
        if self.layer_names is not None:
            missing = [n for n in self.layer_names if n not in groups]
            if missing:
                raise InputError(f"no layers named {missing}; the model's are {', '.join(groups)}")
        self._groups = groups
        self._smoothed = {"": RatioOfAverages(self.decay)}
        self._smoothed.update({name: RatioOfAverages(self.decay) for name in self._kept()})
        self._capture.recorder.recording = self._due(self.steps + 1)
        if self.temperature is not None:
            self.temperature.attach(model)

    def detach(self) -> None:
        """Remove the hooks."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _kept(self) -> list[str]:
        return self.layer_names if self.layer_names is not None else list(self._groups)

    def _due(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def _processes(self) -> bool:
        if self.estimator == "processes" and not distributed():
            raise InputError("estimator='processes' needs torch.distributed with 2+ processes")
        return self.estimator == "processes" or (self.estimator == "auto" and distributed())

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    @full_precision()
    def record(self) -> dict[str, float] | None:
        """After a step's backward (all its micro-batches): measure if the step is due, and
        return the metrics (else None)."""
        if self._capture is None:
            raise RuntimeError("NoiseScale: attach(model) first (or pass model=)")
        if self.temperature is not None:
            self.temperature.record()
        self.steps += 1
        due = self._due(self.steps)
        self._capture.recorder.recording = self._due(self.steps + 1)
        if not due:
            self._capture.forget()
            return None
        estimate = self._estimate()
        self.last = self._metrics(estimate)
        self.history.append(self.last)
        return self.last

    def _estimate(self) -> NoiseEstimate:
        assert self._capture is not None
        space = ParamSpace(self.model)
        params = list(space.params(self.model).values())
        processes = self._processes()
        if all(p.grad is None for p in params):
            self._capture.forget()
            raise RuntimeError(
                "NoiseScale found no gradient after backward(): call record() after "
                "loss.backward() and before zero_grad(); an optimizer that fuses the weight "
                "gradients away (DiffusionMetricSGD's default) needs fused='off' beside it"
            )
        products, _ = self._capture.take(
            space, params, space.names, gather=not processes, compact=False
        )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # one fused pass over .grad, in float32 or wider (bfloat16 gradients included)
        norms = torch._foreach_norm(grads, 2, dtype=compute_dtype(grads[0].dtype))
        mean_sq = torch.stack(norms).double().square()
        if not processes:
            return batch_estimate(products.sq_norms().double(), mean_sq, self._groups)
        weights = torch.full((products.n,), 1 / products.n, dtype=space.dtype, device=space.device)
        local = space.unflatten(products.vjp(weights))
        local_sq = torch.stack([local[n].double().square().sum() for n in space.names])
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(local_sq)
        local_sq /= world
        return cross_process_estimate(
            local_sq.cpu(), mean_sq.cpu(), products.n, products.n * world, self._groups
        )

    def _metrics(self, estimate: NoiseEstimate) -> dict[str, float]:
        """One measurement's record: the step's estimates, the smoothed ones and the
        predicted trade-off at this batch size."""
        record: dict[str, float] = {"step": float(self.steps), "batch": float(estimate.batch)}
        pairs = {"": (estimate.trace, estimate.grad_sq)}
        pairs.update({name: estimate.layers[name] for name in self._kept()})
        for name, (trace, grad_sq) in pairs.items():
            prefix = f"noise/{name}/" if name else "noise/"
            smoothed = self._smoothed[name]
            smoothed.update(trace, grad_sq)
            record[prefix + "trace"] = trace
            record[prefix + "grad_sq"] = grad_sq
            record[prefix + "b_noise"] = noise_scale(trace, grad_sq)
            record[prefix + "b_noise_smoothed"] = smoothed.value
            record[prefix + "b_noise_se"] = smoothed.standard_error
        b_noise = record["noise/b_noise_smoothed"]
        record["noise/steps_ratio"] = steps_ratio(b_noise, estimate.batch)
        record["noise/examples_ratio"] = examples_ratio(b_noise, estimate.batch)
        return record

    # ------------------------------------------------------------------ epochs and files

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """The smoothed values at the end of an epoch (and the temperatures, if kept)."""
        metrics: dict[str, float] = {}
        if self.temperature is not None:
            metrics.update(self.temperature.epoch_metrics(epoch))
        if self.last:
            metrics.update(
                {k: v for k, v in self.last.items() if k.endswith(("_smoothed", "_se", "ratio"))}
            )
        self.flush()
        return metrics

    def flush(self) -> None:
        """Write the measurements so far to ``log`` (if given)."""
        if self.log is not None and self.history:
            write_jsonl(self.log, self.history)

    def on_train_begin(self, trainer: Loop) -> None:
        self.attach(trainer.model)
        if self.log is not None and self.log.is_file() and not self.history:  # a resume
            self.history = [r for r in read_jsonl(self.log) if r.get("step", 0) <= trainer.step]

    def on_after_backward(self, trainer: Loop, x: Any, y: Any, loss: Any) -> None:
        self.record()

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        metrics.update(self.epoch_metrics(epoch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "smoothed": {name: s.state_dict() for name, s in self._smoothed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for name, saved in state["smoothed"].items():
            self._smoothed.setdefault(name, RatioOfAverages(self.decay)).load_state_dict(saved)
        if self._capture is not None:
            self._capture.recorder.recording = self._due(self.steps + 1)


@register_monitor("noise_scale")
class NoiseScaleOptions(MonitorOptions):
    """:class:`NoiseScale` in a config: ``every``, ``decay``, ``estimator``, ``layers``,
    ``temperature``; the measurements go to ``noise_scale.jsonl`` in the run folder."""

    reads_grad: ClassVar[bool] = True

    every: int = Field(1, ge=1)
    decay: float = Field(0.99, gt=0, lt=1)
    estimator: Estimator = "auto"
    layers: list[str] | None = None
    temperature: bool = False

    def build(self, context: MonitorContext) -> Callback:
        log = context.out_dir / "noise_scale.jsonl" if context.out_dir is not None else None
        return NoiseScale(
            every=self.every,
            decay=self.decay,
            estimator=self.estimator,
            layers=self.layers,
            temperature=self.temperature,
            log=log,
        )
