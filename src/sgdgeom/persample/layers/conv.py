r"""``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``, integer zero padding).

A Conv1d is served as a Conv2d of height 1. With :math:`A_i` sample i's input,
:math:`\Delta_i` the gradient at its output and :math:`\mathrm{conv}` the layer's
convolution (same stride, padding and dilation):

- ``jvp``: :math:`g_i\cdot v = \langle \mathrm{conv}(A_i; V), \Delta_i\rangle +
  v_b\cdot\sum_{hw}\Delta_i`, one forward-sized convolution;
- ``vjp``: :math:`\sum_i w_i g_i` is the weight gradient of the batch with output gradients
  :math:`w_i\Delta_i` (``conv2d_weight``);
- ``per_sample``: the weight gradient of each sample alone, as one grouped convolution with
  the samples as groups, ``(b, out·in·k_h·k_w)``.

Grouped convolutions, string padding and other padding modes are declined, so they take the
module-local fallback (exact, slower).
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
    }


def _shape2d(module: nn.Module) -> tuple[int, ...]:
    shape = tuple(cast(nn.Conv2d, module).weight.shape)
    return (*shape[:2], 1, shape[2]) if isinstance(module, nn.Conv1d) else shape


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    """Exact per-sample products of ``Conv1d`` and ``Conv2d`` with ``groups=1``."""

    def supports(self, module: nn.Module) -> str | None:
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            return (
                f"{type(module).__name__} has groups={module.groups}, padding="
                f"{module.padding!r} or padding_mode={module.padding_mode!r}"
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

    def per_sample(self, module: nn.Module, call: ConvCall, names: list[str]) -> Params:
        """Each sample's weight gradient as one grouped weight-gradient convolution, the
        samples as groups: the cost of one batch weight gradient."""
        b, c_in, h, w = call.inputs.shape
        rows = {}
        if "weight" in names:
            shape = _shape2d(module)
            g_w = conv2d_weight(
                call.inputs.reshape(1, b * c_in, h, w),
                (b * shape[0], *shape[1:]),
                call.grads.reshape(1, b * shape[0], *call.grads.shape[2:]),
                **_geometry(module),
                groups=b,
            )
            rows["weight"] = g_w.reshape(b, -1)
        if "bias" in names:
            rows["bias"] = call.grads.sum((2, 3))
        return rows
