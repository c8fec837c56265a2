r"""The module-local fallback: exact per-sample products of any parametrised module.

For a module without a rule (a user's module, a masked attention call, a grouped
convolution...), the capture keeps the module's inputs and the gradients
:math:`\delta_i` at its outputs, and ``torch.func`` differentiates the module alone at those
inputs, with :math:`\theta` its parameters (those of its children included) and
:math:`z_i(\theta)` its output for sample i:

- ``jvp``: :math:`g_i\cdot v = \langle J_{z_i} v, \delta_i\rangle`, one forward-mode product
  of the module over the batch (or the double-VJP trick where forward AD is missing);
- ``vjp``: :math:`\sum_i w_i g_i` is one VJP of the module with cotangents
  :math:`w_i\delta_i`;
- ``per_sample``: ``vmap`` over the samples of the VJP with :math:`\delta_i`. Its memory is
  ``b x`` (the module's parameters) per chunk; ``gram`` and ``sq_norms`` materialise it.

The rule prefers rows (:attr:`~LayerRule.prefer_rows`): where they fit in
:data:`~sgdgeom.persample.capture.ROWS_LIMIT`, the capture forms them once (one ``vmap``,
cheaper than one forward-mode pass through attention) and every product is a matrix
product with them; else every product differentiates the module again.

So one model mixes ghost-product rules and fallback modules, and D stays on the capture
route. The batch is dimension 0 of every input and output, or dimension 1 for a module with
``batch_first=False`` (``nn.MultiheadAttention``'s default); an output without that batch
size is refused. Parameters are those of the module when it was recorded (a snapshot,
shared between chunks while the parameters do not change).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, grad, vjp
from torch.utils._pytree import tree_flatten, tree_unflatten

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.persample.func import (
    jvp_or_double_vjp,
    map_samples,
    needs_loop,
    reference_kernels,
)
from sgdgeom.persample.internal import internal_passes
from sgdgeom.persample.layers.registry import LayerRule, Params, register_fallback, write

__all__ = ["FallbackCall", "FallbackRule"]


@dataclass
class FallbackCall:
    """One call of a module: its parameters and buffers then, its inputs as pytree leaves,
    and the gradients at its tensor outputs."""

    params: Params
    constants: Params
    leaves: list[Any]
    spec: Any
    grads: tuple[Tensor, ...]
    used: list[int]
    batch_dim: int
    batched: list[bool]


_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _snapshot(module: nn.Module) -> tuple[Params, Params]:
    """Clones of the module's trainable parameters, and its frozen ones and buffers; reused
    while no parameter has changed (same tensors, same version counters)."""
    named = list(module.named_parameters())
    key = [(id(p), p._version) for _, p in named]
    cached = _SNAPSHOTS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    params = {n: p.detach().clone() for n, p in named if p.requires_grad}
    constants = {n: p.detach() for n, p in named if not p.requires_grad}
    constants |= {n: b.detach() for n, b in module.named_buffers()}
    _SNAPSHOTS[module] = (key, params, constants)
    return params, constants


def _tensor_leaves(output: Any) -> list[Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.is_floating_point()]


@register_fallback
class FallbackRule(LayerRule):
    """Exact per-sample products of any module through ``torch.func`` (module-local)."""

    recursive = True
    prefer_rows = True

    def record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> tuple[Params, Params, list[Any], Any]:
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        return (*_snapshot(module), leaves, spec)

    def outputs(self, output: Any) -> tuple[Tensor, ...]:
        return tuple(_tensor_leaves(output))

    def call(self, module: nn.Module, saved: Any, grads: tuple[Tensor, ...]) -> FallbackCall:
        params, constants, leaves, spec = saved
        batch_dim = 0 if getattr(module, "batch_first", True) else 1
        used = [k for k, g in enumerate(grads) if bool(g.any())]  # others contribute nothing
        grads = tuple(grads[k] for k in used) or grads[:1]
        used = used or [0]
        sizes = {g.shape[batch_dim] if g.dim() > batch_dim else None for g in grads}
        if len(sizes) != 1 or None in sizes:
            raise UnsupportedModelError(
                f"{type(module).__name__}'s outputs do not share a batch dimension {batch_dim}; "
                f"the module-local fallback needs one"
            )
        (b,) = sizes
        batched = [
            isinstance(t, Tensor) and t.dim() > batch_dim and t.shape[batch_dim] == b
            for t in leaves
        ]
        return FallbackCall(params, constants, leaves, spec, grads, used, batch_dim, batched)

    @staticmethod
    def _forward(module: nn.Module, call: FallbackCall, params: Params, leaves: list) -> list:
        args, kwargs = tree_unflatten(leaves, call.spec)
        with internal_passes():
            output = functional_call(module, {**params, **call.constants}, args, kwargs)
        outputs = _tensor_leaves(output)
        return [outputs[k] for k in call.used]

    def jvp(self, module: nn.Module, call: FallbackCall, v: Params) -> Tensor:

        def contracted(p: Params) -> Tensor:
            outputs = self._forward(module, call, p, call.leaves)
            return sum(
                (z * g).movedim(call.batch_dim, 0).flatten(1).sum(1)
                for z, g in zip(outputs, call.grads, strict=True)
            )

        return jvp_or_double_vjp(contracted, call.params, v)[1]

    def vjp(
        self, module: nn.Module, call: FallbackCall, w: Tensor, out: Params, accumulate: bool
    ) -> None:
        shape = [1] * (call.batch_dim + 1)
        shape[call.batch_dim] = len(w)

        def cotangent(g: Tensor) -> Tensor:
            return g * w.view(*shape, *([1] * (g.dim() - call.batch_dim - 1)))

        _, pullback = vjp(lambda p: self._forward(module, call, p, call.leaves), call.params)[:2]
        (grads,) = pullback([cotangent(g) for g in call.grads])
        for name, target in out.items():
            write(target, grads[name], accumulate)

    def per_sample(self, module: nn.Module, call: FallbackCall, names: list[str]) -> Params:
        dim = call.batch_dim

        def single(params: Params, sample: list, grads: list) -> Tensor:
            leaves = [
                t.unsqueeze(dim) if flag else t
                for t, flag in zip(sample, call.batched, strict=True)
            ]
            outputs = self._forward(module, call, params, leaves)
            return sum((z * g.unsqueeze(dim)).sum() for z, g in zip(outputs, grads, strict=True))

        in_dims = (None, [dim if flag else None for flag in call.batched], [dim] * len(call.grads))
        with reference_kernels():
            per_sample = map_samples(grad(single), in_dims, needs_loop(module))
            rows = per_sample(call.params, call.leaves, list(call.grads))
        return {n: rows[n].reshape(len(rows[n]), -1) for n in names}  # a 0-d parameter too
