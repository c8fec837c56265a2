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
- the rules' mean per-sample gradient must equal autograd's ``.grad`` (as the backward left
  it, before any clipping) for every parameter: a weight also used outside its module (tied
  weights) fails it. The loss's scale cannot be checked and need not be: the per-sample
  losses are those of the loss as written (``c`` times a mean loss has the per-sample
  losses ``c ℓ_i``);
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

import weakref
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
from sgdgeom.persample.recorder import LoopRecorder, NoGrad, Pass, gather_call
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
        #: whether the last :meth:`take`'s ``.grad`` was the backward's own (nothing changed
        #: it since: no clipping, no penalty added by hand), so that the captured mean
        #: gradient may stand for it
        self.grad_is_backward = True
        #: per parameter: its ``.grad`` as the last backward left it (a weak reference and
        #: its version counter), and before the first step a copy, which the check reads
        self._backward_grads: dict[int, tuple[weakref.ref[Tensor], int]] = {}
        self._first_grads: dict[int, Tensor] = {}
        #: this process's samples in the last :meth:`take`
        self.samples = 0
        self._grad_hooks = [
            p.register_post_accumulate_grad_hook(self._backward_done)
            for p in model.parameters()
            if p.requires_grad
        ]

    def _backward_done(self, param: Tensor) -> None:
        """After a backward accumulated ``param.grad``: remember it (and, before the first
        step, copy it), so that a later change to it (``clip_grad_norm_``, an in-place
        penalty, a new tensor) is seen at the step."""
        assert param.grad is not None
        self._backward_grads[id(param)] = (weakref.ref(param.grad), param.grad._version)
        if not self.checked and not distributed():  # under DDP: .grad is reduced after
            self._first_grads[id(param)] = param.grad.detach().clone()

    def _untouched(self, param: Tensor) -> bool:
        """Whether ``param.grad`` is as the last backward left it (absent counts)."""
        grad = param.grad
        if grad is None or isinstance(grad, NoGrad):
            return True
        ref, version = self._backward_grads.get(id(param), (None, -1))
        return ref is not None and ref() is grad and grad._version == version

    def unscale(self, params: Sequence[Tensor], scale: float) -> None:
        """Divide ``.grad`` by a ``GradScaler``'s scale in place, as the backward's own
        (the captures are unscaled with it)."""
        grads = [p.grad for p in params if p.grad is not None]
        untouched = [self._untouched(p) for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / scale)
        if self._first_grads:
            torch._foreach_mul_(list(self._first_grads.values()), 1.0 / scale)
        for p, grad, was in zip(
            [p for p in params if p.grad is not None], grads, untouched, strict=True
        ):
            if was:
                self._backward_grads[id(p)] = (weakref.ref(grad), grad._version)

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
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()

    def idle(self, params: Sequence[Tensor]) -> bool:
        """No forward since the last step and no gradient: nothing to step on."""
        return not self.recorder.passes and all(
            p.grad is None or isinstance(p.grad, NoGrad) for p in params
        )

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
                if p.grad is not None and not isinstance(p.grad, NoGrad) and bool(p.grad.any())
            ]
            if stray:
                raise RuntimeError(
                    f"{', '.join(stray)} received a gradient outside the fused layers (a "
                    f"penalty on the weights, or .grad set by hand); the fused step reads the "
                    f"captures only: use fused='off'"
                )
            for p in params:
                if isinstance(p.grad, NoGrad):
                    p.grad = None
            return products, None
        self.grad_is_backward = all(self._untouched(p) for p in params)
        mean_gradient = self._mean_of([p.grad for p in params], params, space)
        if first:
            self._check_gram(products)
            if gather or not distributed():
                backward = [self._first_grads.get(id(p), p.grad) for p in params]
                own = self._mean_of(backward, params, space)
                self._check_mean(products, own, capture_dtype(passes))
            self.checked = True
            self._first_grads.clear()
            if self.fused and loss_scale is None:  # from now on, no weight gradients
                self.recorder.fusing = True
                for p in params:
                    p.grad = None
        return products, mean_gradient

    def _mean_of(
        self, grads: Sequence[Tensor | None], params: Sequence[Tensor], space: ParamSpace
    ) -> Tensor:
        """The mean gradient ``ḡ`` from the loss's gradients (absent: zero), ``(d,)``:
        the gradient itself for a mean loss, divided by this process's sample count for a
        summed one."""
        pairs = zip(grads, params, strict=True)
        flat = space.flatten([g if g is not None else torch.zeros_like(p) for g, p in pairs])
        return flat / self.samples if self.loss_reduction == "sum" else flat

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
        self.samples = local
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
        if bad:
            raise CoverageError(
                f"per-sample gradients of {describe(bad)} are not exact: a parameter is also "
                f"used outside the forward of the modules that own it: {self.hint}"
            )
