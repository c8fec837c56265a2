r"""``nn.Embedding``: a lookup, whose per-sample gradient scatters the output gradients.

With indices :math:`k_{it}` and output gradients :math:`\delta_{it}` of sample i,
:math:`g_i = \sum_t e_{k_{it}} \delta_{it}^\top` (rows at ``padding_idx`` get no gradient,
as in PyTorch's backward). Hence

- ``jvp``: :math:`g_i\cdot v = \sum_t V_{k_{it}}\cdot\delta_{it}`, a gather;
- ``vjp``: :math:`\sum_i w_i g_i` is one ``index_add`` of the weighted output gradients;
- ``gram``: :math:`g_i\cdot g_j = \sum_{t,s} [k_{it} = k_{js}]\,\delta_{it}\cdot\delta_{js}`,
  without the ``(b, vocabulary, dim)`` rows (used while the ``(b_i T, b_j T)`` products stay
  under :data:`GHOST_LIMIT` entries).

``max_norm`` (which rewrites the weight in the forward) and ``scale_grad_by_freq`` (which
couples the samples of a batch) are declined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from sgdgeom.persample.layers.registry import LayerRule, Params, register_rule

__all__ = ["EmbeddingCall", "EmbeddingRule"]

GHOST_LIMIT = 2**25


@dataclass
class EmbeddingCall:
    """``indices (b, T)`` and output gradients ``grads (b, T, dim)`` (zero at padding)."""

    indices: Tensor
    grads: Tensor


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Exact per-sample products of ``nn.Embedding``."""

    def supports(self, module: nn.Module) -> str | None:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq"
        return None

    def call(self, module: nn.Module, saved: Tensor, grads: tuple[Tensor, ...]) -> EmbeddingCall:
        indices = saved.reshape(len(saved), -1)
        g = grads[0].reshape(len(saved), -1, grads[0].shape[-1])
        padding = cast(nn.Embedding, module).padding_idx
        if padding is not None:
            g = g * indices.ne(padding)[..., None]
        return EmbeddingCall(indices, g)

    def jvp(self, module: nn.Module, call: EmbeddingCall, v: Params) -> Tensor:
        return (v["weight"][call.indices] * call.grads).sum((1, 2))

    def vjp(
        self, module: nn.Module, call: EmbeddingCall, w: Tensor, out: Params, accumulate: bool
    ) -> None:
        if not accumulate:
            out["weight"].zero_()
        weighted = (call.grads * w[:, None, None]).flatten(0, 1)
        out["weight"].index_add_(0, call.indices.flatten(), weighted)

    def per_sample(self, module: nn.Module, call: EmbeddingCall, names: list[str]) -> Params:
        b, _, dim = call.grads.shape
        vocabulary = cast(nn.Embedding, module).num_embeddings
        rows = torch.zeros(b, vocabulary, dim, dtype=call.grads.dtype, device=call.grads.device)
        rows.scatter_add_(1, call.indices[..., None].expand(-1, -1, dim), call.grads)
        return {"weight": rows.flatten(1)}

    def has_ghost_gram(self, module: nn.Module, call: EmbeddingCall) -> bool:
        return call.indices.numel() ** 2 <= GHOST_LIMIT

    def gram(
        self, module: nn.Module, call_i: EmbeddingCall, call_j: EmbeddingCall, names: list[str]
    ) -> Tensor | None:
        if call_i.indices.numel() * call_j.indices.numel() > GHOST_LIMIT:
            return None
        same = call_i.indices[:, :, None, None] == call_j.indices[None, None]
        delta = torch.einsum("itd,jsd->itjs", call_i.grads, call_j.grads)
        return (delta * same).sum((1, 3))

    def sq_norms(self, module: nn.Module, call: EmbeddingCall, names: list[str]) -> Params:
        same = call.indices[:, :, None] == call.indices[:, None, :]
        delta = torch.einsum("itd,isd->its", call.grads, call.grads)
        return {"weight": (delta * same).sum((1, 2))}
