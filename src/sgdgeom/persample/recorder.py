r"""Captures of an ordinary training loop: ``loss = criterion(model(x), y); loss.backward()``.

:class:`LoopRecorder` puts forward hooks on the owner modules of a plan
(:func:`~sgdgeom.persample.capture.plan_layers`) and tensor hooks on their outputs, so each
*pass* (one forward of the model) keeps what its layer rules need and, once a backward runs
through it, the gradients at the layers' outputs. :meth:`LoopRecorder.take` returns only the
passes that a backward reached:

- an extra forward between ``loss = …`` and ``backward()`` (an evaluation inside the loop)
  gets no gradient and is dropped; a forward under ``torch.no_grad()`` is not recorded;
- gradient accumulation over several backward calls gives one pass per micro-batch, and the
  products over their union (one chunk each).

**Fused forwards.** With ``fused=True`` every owner module runs its forward on detached
copies of its parameters, and its outputs go through an identity node (:class:`_Tap`) that
keeps them in the graph. The backward then computes input gradients only; the weight
gradients are left to whoever reads the captures (the metric gradient of
:class:`~sgdgeom.optim.DiffusionMetricSGD` replaces them), and ``.grad`` of those parameters
stays ``None``. It works for every rule, the fallback included, since no rule is involved.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from sgdgeom.persample.capture import Layer, repeat_batchless
from sgdgeom.persample.internal import in_internal_pass
from sgdgeom.persample.layers.fallback import FallbackCall
from sgdgeom.precision import map_tensors

__all__ = ["LoopRecorder", "NoGrad", "Pass", "all_gather", "gather_call"]


@dataclass(eq=False)  # compared by identity: the fields hold tensors
class _Call:
    """One call of one layer: what its rule recorded, and its outputs' gradients so far."""

    layer: int
    saved: Any
    #: dies with the autograd graph that holds the call's gradient hooks (see :class:`_Token`)
    graph: weakref.ref[_Token]
    grads: list[Tensor | None]
    #: each output's zero gradient, made lazily for an output no gradient reached
    zeros: list[tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def output_grads(self, loss_scale: float | None = None) -> tuple[Tensor, ...]:
        """The outputs' gradients, zero for an output that no gradient reached (one the
        forward computed and the loss never used, such as an LSTM's final state), divided
        by a ``GradScaler``'s ``loss_scale`` if given (float16 ones in float32 first, where
        the unscaled values could underflow)."""
        grads = tuple(
            g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
            for g, (shape, dtype, device) in zip(self.grads, self.zeros, strict=True)
        )
        if loss_scale is None:
            return grads
        return tuple(
            (g.float() if g.dtype == torch.float16 else g) * (1.0 / loss_scale) for g in grads
        )


@dataclass(eq=False)  # by identity too
class Pass:
    """One forward of the model: its batch size and the calls of its layers."""

    size: int
    calls: list[_Call] = field(default_factory=list)
    #: the model's input, when the forward took one tensor and nothing else
    inputs: Tensor | None = None

    def reached(self) -> bool:
        """Whether a backward has reached any of its calls."""
        return any(g is not None for call in self.calls for g in call.grads)

    def alive(self) -> bool:
        """Whether a backward may still reach it: the graph of one of its calls is still
        held (by a loss not yet backpropagated, say). An output tensor itself may be freed
        long before (a Linear's output feeding Tanh, which saves its result): only its node
        in the graph, where the hooks live, says whether a backward can come."""
        return any(call.graph() is not None for call in self.calls)


class NoGrad(Tensor):
    """The ``.grad`` of a parameter after a fused backward, which computes none: it has the
    parameter's shape, dtype and device (no memory: one zero, expanded), can be zeroed or
    dropped (``zero_grad``), and refuses every other use with an error that says why, so
    that ``clip_grad_norm_`` or a gradient monitor never acts on a gradient that is not
    there."""

    parameter: str

    @staticmethod
    def like(param: Tensor, name: str) -> NoGrad:
        zero = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
        grad = Tensor._make_subclass(NoGrad, zero, False)
        grad.parameter = name
        return grad

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in ("zero_", "_foreach_zero_"):
            return None  # it is zero already
        if name in ("__get__", "detach_", "requires_grad_", "__repr__"):  # metadata only
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        holder = next(a for a in tree_leaves((args, kwargs)) if isinstance(a, NoGrad))
        raise RuntimeError(
            f"{holder.parameter}.grad was read ({name or func}), but the fused step computes "
            f"no weight gradients: the backward left them to the step. Gradient clipping, "
            f"a gradient monitor or any other use of .grad needs the unfused step: pass "
            f"fused='off'"
        )


class _Token:
    """Held only by a call's gradient hooks, which the autograd graph holds: a weak
    reference to it dies when the graph is freed (after its backward, or when nothing
    refers to its loss any more)."""


class _Tap(torch.autograd.Function):
    """Identity on a fused layer's output that keeps it in the graph (through ``anchor``, a
    leaf that requires grad) when neither its input nor its detached parameters do."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor) -> Tensor:
        return output.clone()  # not a view: a later in-place op (ReLU(inplace=True)) is fine

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


@contextlib.contextmanager
def _detached_parameters(module: nn.Module, recursive: bool) -> Iterator[None]:
    """Run the module on detached copies of its parameters (restored afterwards)."""
    owners = list(module.modules()) if recursive else [module]
    saved = [(m, name, p) for m in owners for name, p in m._parameters.items() if p is not None]
    for m, name, p in saved:
        m._parameters[name] = p.detach()  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p


class LoopRecorder:
    """Records the passes of a training loop over a plan's layers (see the module doc).

    Args:
        model: the model whose forward opens a pass (a DDP wrapper included).
        layers: the plan of its owner modules.
        fused: give the layers fused forwards (input gradients only); see :attr:`fusing`.
    """

    def __init__(self, model: nn.Module, layers: list[Layer], fused: bool = False) -> None:
        self.layers = layers
        self.fused = fused
        #: whether the fused forwards skip the weight gradients now (switched by the owner,
        #: e.g. on only after a first, unfused step has been checked)
        self.fusing = False
        #: whether forwards are recorded now (off: the model runs as if unhooked, e.g.
        #: between the steps a monitor measures)
        self.recording = True
        self.passes: list[Pass] = []
        self._marking = False
        self._anchor = torch.zeros((), requires_grad=True)
        self._handles = [model.register_forward_pre_hook(self._open_pass, with_kwargs=True)]
        for k, layer in enumerate(layers):
            hook = functools.partial(self._record, k)
            self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            if fused:
                layer.module.forward = functools.partial(_fused_forward, self, layer)

    def remove(self) -> None:
        """Remove the hooks and give the layers their own forward back."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _forget(self.passes)
        if self.fused:
            for layer in self.layers:
                layer.module.__dict__.pop("forward", None)
                for param in layer.module.parameters(recurse=layer.rule.recursive):
                    if isinstance(param.grad, NoGrad):
                        param.grad = None
        self.passes.clear()

    # ------------------------------------------------------------------ hooks

    def _open_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict) -> None:
        if not (self.recording and torch.is_grad_enabled()) or in_internal_pass():
            return
        # passes that no backward reached and none can reach any more hold memory only
        kept = [p for p in self.passes if p.reached() or p.alive()]
        _forget([p for p in self.passes if p not in kept])
        self.passes = kept
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        first = tensors[0] if tensors else None
        size = len(first) if first is not None and first.dim() else 0
        alone = len(args) == 1 and not kwargs and first is not None
        self.passes.append(
            Pass(size, inputs=first.detach() if alone and first is not None else None)
        )

    def _record(self, k: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not (torch.is_grad_enabled() and self.passes) or in_internal_pass():
            return None
        rule = self.layers[k].rule
        if not any(t.requires_grad for t in rule.outputs(output)):
            return None
        saved = rule.record(module, args, kwargs, output)
        repeated = repeat_batchless(saved, output, self.passes[-1].size)
        if repeated is not None:  # an input without the batch dimension
            saved, output = repeated
        outputs = list(rule.outputs(output))
        token = _Token()
        call = _Call(
            k,
            saved,
            weakref.ref(token),
            [None] * len(outputs),
            [(t.shape, t.dtype, t.device) for t in outputs],
        )
        for j, t in enumerate(outputs):
            if t.requires_grad:
                hook = functools.partial(self._store_grad, call, j, token)
                call.handles.append(t.register_hook(hook))
        self.passes[-1].calls.append(call)
        return output if repeated is not None else None

    def _store_grad(self, call: _Call, j: int, token: _Token, grad: Tensor) -> None:
        grad = grad.detach()
        previous = call.grads[j]
        call.grads[j] = grad if previous is None else previous + grad
        if self.fusing and not self._marking:
            self._marking = True  # once per backward: at its end, mark the absent .grad
            torch.autograd.Variable._execution_engine.queue_callback(self._mark_absent_grads)

    def _mark_absent_grads(self) -> None:
        """At the end of a fused backward: the layers' parameters that got no ``.grad``
        (the fused forwards make none) get a :class:`NoGrad`, so a read of ``.grad``
        (gradient clipping, a gradient monitor) raises instead of seeing nothing."""
        self._marking = False
        for layer in self.layers:
            named = dict(layer.module.named_parameters(recurse=layer.rule.recursive))
            for name in layer.names:
                param = named[name]
                if param.grad is None:
                    param.grad = NoGrad.like(param, layer.qualified(name))

    # ------------------------------------------------------------------ reading

    def take(self) -> list[Pass]:
        """The passes that a backward reached since the last call, in order; all recorded
        passes are forgotten."""
        reached = [p for p in self.passes if p.reached()]
        _forget(self.passes)  # a later backward through them must not write into them
        self.passes = []
        return reached

    def calls(self, recorded: Pass, loss_scale: float | None = None) -> list[list[Any]]:
        """One pass's calls per layer, as the rules take them (a call that no gradient
        reached contributes nothing and is left out; a missing output gradient is zero),
        the output gradients divided by ``loss_scale`` if given."""
        out: list[list[Any]] = [[] for _ in self.layers]
        for call in recorded.calls:
            if all(g is None for g in call.grads):
                continue
            layer = self.layers[call.layer]
            grads = call.output_grads(loss_scale)
            out[call.layer].append(layer.rule.call(layer.module, call.saved, grads))
        return [
            self.layers[k].rule.merge(self.layers[k].module, c) if c else c
            for k, c in enumerate(out)
        ]


def _forget(passes: list[Pass]) -> None:
    for recorded in passes:
        for call in recorded.calls:
            for handle in call.handles:
                handle.remove()


def _fused_forward(recorder: LoopRecorder, layer: Layer, *args: Any, **kwargs: Any) -> Any:
    """The module's own forward, on detached parameters when fusing; an output that would
    leave the graph (no input requires grad) is tapped back into it."""
    module = layer.module
    forward = type(module).forward
    if not (recorder.fusing and torch.is_grad_enabled()) or in_internal_pass():
        return forward(module, *args, **kwargs)
    with _detached_parameters(module, layer.rule.recursive):
        output = forward(module, *args, **kwargs)
    anchor = recorder._anchor
    return tree_map(
        lambda t: (
            _Tap.apply(t, anchor)
            if isinstance(t, Tensor) and t.is_floating_point() and not t.requires_grad
            else t
        ),
        output,
    )


def all_gather(t: Tensor, dim: int = 0) -> Tensor:
    """Concatenate ``t`` of every process along ``dim`` (equal shapes required)."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def gather_call(call: Any) -> Any:
    """A call with the samples of every process (``torch.distributed``): each batched tensor
    all-gathered along its batch dimension (dim 0, or a fallback call's own), through nested
    calls, dicts and lists."""
    if isinstance(call, FallbackCall):
        leaves = [
            all_gather(t, call.batch_dim) if flag else t
            for t, flag in zip(call.leaves, call.batched, strict=True)
        ]
        grads = tuple(all_gather(g, call.batch_dim) for g in call.grads)
        return replace(call, leaves=leaves, grads=grads)
    return map_tensors(call, all_gather)
