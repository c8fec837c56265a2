r"""The per-sample products of a training loop's steps, checked.

:class:`StepCapture` is what an optimizer that reads per-sample gradients from an ordinary
``loss = criterion(model(x), y); loss.backward(); opt.step()`` loop needs, and nothing of
its update rule: it hooks the owner module of every parameter
(:class:`~sgdgeom.persample.recorder.LoopRecorder`), and at each step :meth:`StepCapture.take`
turns the passes that the backward reached into one set of
:class:`~sgdgeom.persample.capture.CaptureProducts` (one chunk per pass; all-gathered under
DDP), scaled from the loss's output gradients to the per-sample ones.

**The first step is checked**, where a wrong product would otherwise go unnoticed:

- on 8 of the step's inputs, with the per-sample "loss" ``f_i = u · model(x)_i`` for a
  fixed ``u``, the rules' per-sample gradients weighted by random ``r_i`` must equal
  autograd's gradient of ``Σ_i r_i f_i``: a layer that takes another axis for the samples
  (sequence-first, with a length equal to the batch) fails it;
- the rules' mean per-sample gradient must equal autograd's ``.grad`` for every parameter:
  a weight also used outside its module (tied weights), or a loss scaled otherwise than
  ``loss_reduction`` says, fails it;
- each rule's Gram formula must agree on its diagonal with the squared norms of the rule's
  own per-sample rows (:func:`~sgdgeom.persample.capture.gram_failures`): a rule whose
  Gram matrix mixes up two axes of the same size is refused, not used.

A failure raises :class:`~sgdgeom.persample.capture.CoverageError` naming the parameter.

**Fused** captures (``fused=True``): once the first step has been checked, the layers run on
detached parameters, so the backward computes input gradients only, and the weight
gradients are left to whoever reads the products (``.grad`` stays ``None``); a gradient that
reaches a parameter outside its module is then an error, not a silent drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sgdgeom.params import ParamSpace
from sgdgeom.persample.capture import (
    UNCOVERED_CAUSES,
    CaptureProducts,
    Chunk,
    CoverageError,
    compact_calls,
    coverage_failures,
    describe,
    gram_failures,
    plan_layers,
    uncovered,
)
from sgdgeom.persample.losses import check_independent_samples
from sgdgeom.persample.recorder import LoopRecorder, Pass, gather_call
from sgdgeom.precision import capture_dtype

__all__ = ["LossReduction", "StepCapture", "distributed"]

LossReduction = Literal["mean", "sum"]

CLOSURE_HINT = "call step(closure) with a closure that returns the per-sample losses (B,)"


class _UnprobedError(Exception):
    """The model's output is not one batched tensor, so the sample check cannot probe it."""


def distributed() -> bool:
    """Whether this process is one of several of an initialised ``torch.distributed`` group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StepCapture:
    """The checked per-sample products of a training loop's steps (see the module doc).

    Args:
        model: the model whose loop is captured (a DDP wrapper included).
        fused: give the layers fused forwards once the first step is checked.
        loss_reduction: ``"mean"`` (the loss is the mean of the per-sample losses over the
            samples since the last step) or ``"sum"``.
        hint: what a refused model should do instead, appended to the refusals.

    Raises:
        CoverageError: a parameter belongs to no module of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fused: bool = False,
        loss_reduction: LossReduction = "mean",
        hint: str = CLOSURE_HINT,
    ) -> None:
        self.model = model
        self.loss_reduction = loss_reduction
        self.hint = hint
        self.recorder = LoopRecorder(model, plan_layers(model), fused=fused)
        self.checked = False

    @property
    def fused(self) -> bool:
        """Whether the layers get fused forwards (from the second step on)."""
        return self.recorder.fused

    @property
    def fusing(self) -> bool:
        """Whether the backward skips the weight gradients now."""
        return self.recorder.fusing

    def remove(self) -> None:
        """Remove the hooks and give the layers their own forward back."""
        self.recorder.remove()

    def idle(self, params: Sequence[Tensor]) -> bool:
        """No forward since the last step and no gradient: nothing to step on."""
        return not self.recorder.passes and all(p.grad is None for p in params)

    def forget(self) -> None:
        """Drop what was recorded since the last step (a closure's own forward)."""
        self.recorder.take()

    # ------------------------------------------------------------------ one step

    def take(
        self,
        space: ParamSpace,
        params: Sequence[Tensor],
        names: Sequence[str],
        *,
        loss_scale: float | None = None,
        gather: bool = True,
        compact: bool = True,
    ) -> tuple[CaptureProducts, Tensor | None]:
        """The step's products and, unless fusing, the mean gradient from ``.grad``;
        raises where the step would be wrong. The first step is checked (module doc) and,
        with ``fused``, switches the fused forwards on.

        ``loss_scale``: the scale of a ``torch.amp.GradScaler`` (the captured output
        gradients are those of the scaled loss, ``.grad`` already unscaled). A loss-scaled
        loop is not fused: the scaler finds overflows in the ``.grad`` that fusing skips.

        ``gather=False`` keeps the products of this process's samples under DDP (no
        all-gather); the mean gradient is then the all-reduced ``.grad``, which the first
        step's check cannot compare with them. ``compact=False`` keeps every layer's calls
        (no per-sample rows formed for a Gram matrix that will not be needed: a monitor
        that reads the squared norms only)."""
        fusing = self.fusing
        if loss_scale is not None:
            self.recorder.fusing = False
        check_independent_samples(self.model, dropout=False)
        passes = self.recorder.take()
        if not passes:
            raise RuntimeError(
                "saw no backward through the model since the last step: call "
                "loss.backward() on the model's output before step() (a forward alone, or "
                "one under torch.no_grad(), makes no step)"
            )
        first = not self.checked and not fusing
        if first and passes[0].inputs is not None and not distributed():
            self._check_samples(passes[0].inputs, space)
        products = self._products(passes, space, loss_scale, gather, compact)
        if fusing:
            stray = [
                n
                for n, p in zip(names, params, strict=True)
                if p.grad is not None and bool(p.grad.any())
            ]
            if stray:
                raise RuntimeError(
                    f"{', '.join(stray)} received a gradient outside the fused layers (a "
                    f"penalty on the weights, or .grad set by hand); the fused step reads the "
                    f"captures only: use fused='off'"
                )
            return products, None
        mean_gradient = space.flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        )
        if first:
            self._check_gram(products)
            if gather or not distributed():
                self._check_mean(products, mean_gradient, capture_dtype(passes))
            self.checked = True
            if self.fused and loss_scale is None:  # from now on, no weight gradients
                self.recorder.fusing = True
                for p in params:
                    p.grad = None
        return products, mean_gradient

    def _products(
        self,
        passes: list[Pass],
        space: ParamSpace,
        loss_scale: float | None,
        gather: bool,
        compact: bool,
    ) -> CaptureProducts:
        """The captured passes as one set of products (one chunk per pass), all-gathered
        under DDP, scaled from the mean loss's output gradients to the per-sample ones
        (unscaled first by a ``GradScaler``'s ``loss_scale``: before any product, so no
        Gram entry overflows with the scale squared)."""
        recorder = self.recorder
        world = torch.distributed.get_world_size() if gather and distributed() else 1
        chunks, start, local = [], 0, 0
        for recorded in passes:
            calls = [
                compact_calls(layer, layer_calls, recorded.size) if compact else layer_calls
                for layer, layer_calls in zip(
                    recorder.layers, recorder.calls(recorded, loss_scale), strict=True
                )
            ]
            if world > 1:
                calls = [[gather_call(call) for call in layer_calls] for layer_calls in calls]
            chunks.append(Chunk(start, recorded.size * world, calls, None))
            start += recorded.size * world
            local += recorded.size
        scale = local if self.loss_reduction == "mean" else 1.0
        return CaptureProducts.from_chunks(space, recorder.layers, chunks, scale)

    def _check_samples(self, inputs: Tensor, space: ParamSpace) -> None:
        """The first check of the module doc: the samples are what the rules take for
        samples."""

        def probe(output: Any, _: Any) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() == 0:
                raise _UnprobedError
            flat = output.flatten(1)
            u = torch.linspace(-1.0, 1.0, flat.shape[1], dtype=flat.dtype, device=flat.device)
            return flat @ u

        x = inputs[:8]
        try:
            bad = coverage_failures(self.model, self.recorder.layers, space, probe, x, x)
        except _UnprobedError:
            return  # the output is not one batched tensor: the second check alone
        except RuntimeError as err:  # a layer's calls lack the batch along dim 0
            bad = {f"a layer's calls ({err})": float("nan")}
        if bad:
            raise CoverageError(
                f"per-sample gradients of {describe(bad)} are not exact: {UNCOVERED_CAUSES}: "
                f"{self.hint}"
            )

    def _check_gram(self, products: CaptureProducts) -> None:
        """The third check of the module doc: each rule's Gram formula agrees on its
        diagonal with the squared norms of the rule's own per-sample rows."""
        bad = gram_failures(products)
        if bad:
            raise CoverageError(
                f"the Gram formula of the layer rule of {describe(bad)} disagrees with the "
                f"rule's own per-sample gradients: the rule is wrong for these shapes (an "
                f"index that mixes up two axes of the same size?); {self.hint}"
            )

    def _check_mean(
        self, products: CaptureProducts, mean_gradient: Tensor, captured: torch.dtype | None
    ) -> None:
        """The second check of the module doc: the rules' mean per-sample gradient is
        autograd's ``.grad``."""
        space = products.space
        weights = torch.full((products.n,), 1 / products.n, dtype=space.dtype, device=space.device)
        summed = space.unflatten(products.vjp(weights))
        expected = list(space.unflatten(mean_gradient).values())
        bad = uncovered(summed, expected, captured)
        if not bad:
            return
        ratios = [
            float(e.norm() / g.norm()) for g, e in zip(summed.values(), expected, strict=True)
        ]
        hint = (
            f"the loss's gradient is {ratios[0]:.4g} times the mean of the per-sample gradients "
            f"for every parameter: loss_reduction={self.loss_reduction!r} does not match the "
            f"loss (with gradient accumulation, divide each micro-batch's mean loss by their "
            f"number)"
            if len(bad) == len(ratios) and max(ratios) - min(ratios) < 1e-6 * max(ratios)
            else f"a parameter is also used outside the forward of the modules that own it: "
            f"{self.hint}"
        )
        raise CoverageError(f"per-sample gradients of {describe(bad)} are not exact: {hint}")
