r"""Normalisation layers' affine parameters: LayerNorm, RMSNorm, GroupNorm, BatchNorm (eval).

Each computes :math:`z = \hat x \odot \gamma + \beta` with :math:`\hat x` the normalised
input, which does not depend on :math:`\gamma, \beta`. Written with positions t and features
p (LayerNorm: p over ``normalized_shape``; GroupNorm and BatchNorm: p over channels, t over
the spatial positions), :math:`g_{i,\gamma} = \sum_t \delta_{it}\odot\hat x_{it}` and
:math:`g_{i,\beta} = \sum_t \delta_{it}`; products are elementwise, and rows are only
``(b, features)``.

BatchNorm is exact in eval mode with running statistics only: in train mode it couples the
samples, which :func:`~sgdgeom.persample.losses.check_independent_samples` refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sgdgeom.persample.layers.registry import LayerRule, Params, register_rule, write

__all__ = ["AffineCall", "BatchNormRule", "GroupNormRule", "LayerNormRule"]


@dataclass
class AffineCall:
    """The normalised input and the output gradient, both ``(b, T, P)``."""

    normalized: Tensor
    grads: Tensor


class _AffineRule(LayerRule):
    """The shared products of ``z = x̂ ⊙ γ + β``; subclasses normalise and lay out."""

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def layout(self, module: nn.Module, t: Tensor) -> Tensor:
        """``(b, channels, *spatial) -> (b, spatial, channels)`` (the default)."""
        return t.reshape(len(t), t.shape[1], -1).transpose(1, 2)

    def record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Tensor:
        with torch.no_grad():
            return self.normalize(module, args[0].detach())

    def call(self, module: nn.Module, saved: Tensor, grads: tuple[Tensor, ...]) -> AffineCall:
        return AffineCall(self.layout(module, saved), self.layout(module, grads[0]))

    def jvp(self, module: nn.Module, call: AffineCall, v: Params) -> Tensor:
        out = torch.zeros(len(call.grads), dtype=call.grads.dtype, device=call.grads.device)
        if "weight" in v:
            out = (call.grads * call.normalized).sum(1) @ v["weight"].reshape(-1)
        if "bias" in v:
            out = out + call.grads.sum(1) @ v["bias"].reshape(-1)
        return out

    def vjp(
        self, module: nn.Module, call: AffineCall, w: Tensor, out: Params, accumulate: bool
    ) -> None:
        if "weight" in out:
            value = torch.einsum("btp,btp,b->p", call.grads, call.normalized, w)
            write(out["weight"], value.view(out["weight"].shape), accumulate)
        if "bias" in out:
            value = torch.einsum("btp,b->p", call.grads, w)
            write(out["bias"], value.view(out["bias"].shape), accumulate)

    def per_sample(self, module: nn.Module, call: AffineCall, names: list[str]) -> Params:
        rows = {}
        if "weight" in names:
            rows["weight"] = (call.grads * call.normalized).sum(1)
        if "bias" in names:
            rows["bias"] = call.grads.sum(1)
        return rows


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineRule):
    """``nn.LayerNorm``: features are the ``normalized_shape`` trailing dimensions."""

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        norm = cast(nn.LayerNorm, module)
        return F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)

    def layout(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(len(t), -1, math.prod(cast(nn.LayerNorm, module).normalized_shape))


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    class RMSNormRule(LayerNormRule):
        """``nn.RMSNorm``: as LayerNorm, without centring or bias."""

        def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
            norm = cast(nn.RMSNorm, module)
            return F.rms_norm(x, norm.normalized_shape, None, norm.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineRule):
    """``nn.GroupNorm``: one affine parameter per channel."""

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        norm = cast(nn.GroupNorm, module)
        return F.group_norm(x, norm.num_groups, None, None, norm.eps)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(_AffineRule):
    """BatchNorm in eval mode: ``x̂ = (x − running_mean) / sqrt(running_var + eps)``."""

    def supports(self, module: nn.Module) -> str | None:
        if module.training or module.running_mean is None:
            return "BatchNorm in train mode or without running statistics"
        return None

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        norm = cast(nn.modules.batchnorm._BatchNorm, module)
        return F.batch_norm(
            x, norm.running_mean, norm.running_var, None, None, False, 0.0, norm.eps
        )

    def layout(self, module: nn.Module, t: Tensor) -> Tensor:
        return super().layout(module, t if t.dim() > 2 else t[..., None])
