r"""``nn.Conv1d`` and ``nn.Conv2d`` (any ``groups``, depthwise included; integer zero padding).

A Conv1d is served as a Conv2d of height 1. With :math:`A_i` sample i's input,
:math:`\Delta_i` the gradient at its output and :math:`\mathrm{conv}` the layer's
convolution (same stride, padding and dilation):

- ``jvp``: :math:`g_i\cdot v = \langle \mathrm{conv}(A_i; V), \Delta_i\rangle +
  v_b\cdot\sum_{hw}\Delta_i`, one forward-sized convolution;
- ``vjp``: :math:`\sum_i w_i g_i` is the weight gradient of the batch with output gradients
  :math:`w_i\Delta_i` (``conv2d_weight``);
- ``per_sample``: the weight gradient of each sample alone, as one grouped convolution with
  the samples as groups (times the layer's own groups), ``(b, out·in/groups·k_h·k_w)``;
- ``sq_norms`` (ungrouped layers with few output positions against their channels, the
  deep layers of a CNN): :math:`\|g_i\|^2 = \sum_{t,s} (u_{it}\cdot u_{is})
  (\delta_{it}\cdot\delta_{is})` over the output positions, with :math:`u_{it}` the
  unfolded input patch and :math:`\delta_{it}` the output gradient at position t, never
  forming the rows.

A grouped convolution (``groups = G``, a depthwise one with ``G = in``) is the same
formulas with the layer's groups: each sample's ``G`` groups are consecutive blocks of its
channels, so ``b`` samples are ``b G`` groups of one convolution. String padding and other
padding modes are declined, so they take the module-local fallback (exact, slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from sgdgeom.persample.layers.registry import LayerRule, Params, register_rule, write

__all__ = ["ConvCall", "ConvRule"]


@dataclass
class ConvCall:
    """``inputs (b, C_in, H, W)`` and ``grads (b, C_out, H', W')`` (``H = 1`` for Conv1d)."""

    inputs: Tensor
    grads: Tensor


def _pair(module: nn.Module, attribute: str, one: int) -> tuple[int, int]:
    value = tuple(getattr(module, attribute))
    return (one, value[0]) if isinstance(module, nn.Conv1d) else value


def _geometry(module: nn.Module) -> dict[str, Any]:
    return {
        "stride": _pair(module, "stride", 1),
        "padding": _pair(module, "padding", 0),
        "dilation": _pair(module, "dilation", 1),
        "groups": module.groups,
    }


def _shape2d(module: nn.Module) -> tuple[int, ...]:
    shape = tuple(cast(nn.Conv2d, module).weight.shape)
    return (*shape[:2], 1, shape[2]) if isinstance(module, nn.Conv1d) else shape


UNFOLD_RATIO = 8  # unfold where a patch has at least this many times the output positions


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    """Exact per-sample products of ``Conv1d`` and ``Conv2d``, grouped ones included."""

    @staticmethod
    def _unfolds(module: nn.Module, call: ConvCall) -> bool:
        """Whether :meth:`per_sample` takes the unfolded route (ungrouped layers whose
        patches, ``in·k_h·k_w``, are at least :data:`UNFOLD_RATIO` times the ``L`` output
        positions)."""
        _, fan_in, k_h, k_w = _shape2d(module)
        positions = call.grads.shape[2] * call.grads.shape[3]
        return bool(module.groups == 1) and fan_in * k_h * k_w >= UNFOLD_RATIO * positions

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return (
                f"{type(module).__name__} has padding={module.padding!r} or "
                f"padding_mode={module.padding_mode!r}"
            )
        return None

    def call(self, module: nn.Module, saved: Tensor, grads: tuple[Tensor, ...]) -> ConvCall:
        a, g = saved, grads[0]
        if isinstance(module, nn.Conv1d):
            a, g = a.unsqueeze(2), g.unsqueeze(2)
        return ConvCall(a, g)

    def jvp(self, module: nn.Module, call: ConvCall, v: Params) -> Tensor:
        out = torch.zeros(len(call.grads), dtype=call.grads.dtype, device=call.grads.device)
        if "weight" in v:
            kernel = v["weight"].reshape(_shape2d(module))
            response = F.conv2d(call.inputs, kernel, None, **_geometry(module))
            out = (response * call.grads).sum((1, 2, 3))
        if "bias" in v:
            out = out + call.grads.sum((2, 3)) @ v["bias"]
        return out

    def vjp(
        self, module: nn.Module, call: ConvCall, w: Tensor, out: Params, accumulate: bool
    ) -> None:
        weighted = call.grads * w[:, None, None, None]
        if "weight" in out:
            g_w = conv2d_weight(call.inputs, _shape2d(module), weighted, **_geometry(module))
            write(out["weight"], g_w.view(out["weight"].shape), accumulate)
        if "bias" in out:
            write(out["bias"], weighted.sum((0, 2, 3)), accumulate)

    def costs(
        self, module: nn.Module, call: ConvCall, size: int, numel: int
    ) -> tuple[float, float]:
        """A product is one convolution, ``b H' W' × numel(weight)``; the Gram matrix
        materialises the rows (one grouped convolution of that cost) and multiplies them."""
        product = float(size * call.grads[0, 0].numel() * cast(nn.Conv2d, module).weight.numel())
        return product, product + float(size * size * numel)

    def sq_norms(self, module: nn.Module, call: ConvCall, names: list[str]) -> Params | None:
        """``‖g_i‖²`` of an ungrouped layer by each sample's ``(L, L)`` Gram matrices of its
        unfolded patches and its output gradients, contracted, where their ``L² (in k_h k_w
        + out)`` is at most the rows' ``L · in k_h k_w · out`` (L output positions); else
        None (the rows)."""
        out_c, fan_in, k_h, k_w = _shape2d(module)
        patch = fan_in * k_h * k_w
        delta = call.grads.flatten(2)  # (b, out, L)
        positions = delta.shape[2]
        if module.groups != 1 or positions * (patch + out_c) > patch * out_c:
            return None
        norms = {}
        if "weight" in names:
            geometry = _geometry(module)
            del geometry["groups"]
            patches = F.unfold(call.inputs, (k_h, k_w), **geometry)  # (b, in k², L)
            grams = torch.bmm(patches.transpose(1, 2), patches)
            norms["weight"] = (grams * torch.bmm(delta.transpose(1, 2), delta)).sum((1, 2))
        if "bias" in names:
            norms["bias"] = delta.sum(2).square().sum(1)
        return norms

    def per_sample(self, module: nn.Module, call: ConvCall, names: list[str]) -> Params:
        """Each sample's weight gradient, at the cost of one batch weight gradient: as one
        batched matrix product ``Δ_i U_iᵀ`` with the unfolded input ``U_i`` (``(in·k_h·k_w,
        L)`` for L output positions) where the patches are long against the positions
        (:data:`UNFOLD_RATIO`: the late layers of a CNN, where a grouped convolution with
        the samples as groups runs several times slower on the CPU), else as that grouped
        weight-gradient convolution, the samples (times the layer's groups) as groups."""
        b, c_in, h, w = call.inputs.shape
        rows = {}
        if "weight" in names and self._unfolds(module, call):
            geometry = _geometry(module)
            del geometry["groups"]
            patches = F.unfold(call.inputs, _shape2d(module)[2:], **geometry)  # (b, in k², L)
            rows["weight"] = torch.bmm(call.grads.flatten(2), patches.transpose(1, 2)).flatten(1)
        elif "weight" in names:
            shape = _shape2d(module)
            geometry = _geometry(module)
            geometry["groups"] *= b
            g_w = conv2d_weight(
                call.inputs.reshape(1, b * c_in, h, w),
                (b * shape[0], *shape[1:]),
                call.grads.reshape(1, b * shape[0], *call.grads.shape[2:]),
                **geometry,
            )
            rows["weight"] = g_w.reshape(b, -1)
        if "bias" in names:
            rows["bias"] = call.grads.sum((2, 3))
        return rows
