r"""``nn.MultiheadAttention``: its projections are Linear layers around a parameter-free core.

With inputs :math:`q, k, v` (``(B, L, E)``, ``(B, S, E)``), the module computes projections
:math:`z_q = q W_q^\top + b_q` (and :math:`z_k, z_v`), the attention core
:math:`o = \mathrm{attn}(z_q, z_k, z_v)` (``scaled_dot_product_attention`` over the heads),
and :math:`\mathrm{out} = o W_o^\top + b_o`. Given the gradient :math:`\delta` at ``out``,
one local backward through the core gives :math:`\delta_q, \delta_k, \delta_v` at the
projections, and then every parameter is a Linear rule's: ``in_proj_weight``'s three blocks
are Linear layers on :math:`(q, \delta_q)`, :math:`(k, \delta_k)`, :math:`(v, \delta_v)`, and
``out_proj`` is one on :math:`(o, \delta)`. The per-sample products cost one forward and
backward of the core per call (the fallback's ``vmap`` costs more, and runs in Python per
product).

Served: ``E = kdim = vdim``, no ``bias_k``/``bias_v``, no ``add_zero_attn``, and no dropout
in train mode. A call with an attention mask, a key padding mask or ``is_causal`` is served by
the module-local fallback, as is a module this rule declines. The first call of each module
in each of train and eval mode also checks that the recomputed output equals the module's,
so a mismatch is an error, never a wrong number; later calls skip that host read (the
computation it checks is then the same, and a GPU step need not wait for it).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.persample.layers.fallback import FallbackCall, FallbackRule
from sgdgeom.persample.layers.linear import LinearCall, LinearRule
from sgdgeom.persample.layers.registry import LayerRule, Params, register_rule

__all__ = ["AttentionCall", "MultiheadAttentionRule"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_LINEAR = LinearRule()
_BLOCKS = ("q", "k", "v")


@dataclass
class AttentionCall:
    """The three input projections' and the output projection's Linear calls, batch first."""

    projections: dict[str, LinearCall]
    out: LinearCall


def _batch_first(module: nn.MultiheadAttention, t: Tensor) -> Tensor:
    return t if module.batch_first else t.transpose(0, 1)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    """Exact per-sample products of ``nn.MultiheadAttention`` (unmasked calls)."""

    recursive = True  # out_proj is a child module, used inside this module's forward
    prefer_rows = True

    def __init__(self) -> None:
        self._fallback = FallbackRule()
        #: the (module, training) pairs whose recomputed output has been checked
        self._checked: weakref.WeakKeyDictionary[nn.Module, set[bool]] = weakref.WeakKeyDictionary()

    def supports(self, module: nn.Module) -> str | None:
        if (
            not module._qkv_same_embed_dim
            or module.bias_k is not None
            or module.add_zero_attn
            or (module.training and module.dropout > 0)
        ):
            return "MultiheadAttention with kdim/vdim, bias_k/bias_v, add_zero_attn or dropout"
        return None

    def record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        masked = (
            given["attn_mask"] is not None
            or given["key_padding_mask"] is not None
            or given["is_causal"]
            or given["query"].dim() != 3
        )
        if masked:
            return ("fallback", self._fallback.record(module, args, kwargs, output))
        inputs = [given[name].detach() for name in ("query", "key", "value")]
        return ("own", inputs, output[0].detach())

    def outputs(self, output: Any) -> tuple[Tensor, ...]:
        return self._fallback.outputs(output)

    def call(self, module: nn.Module, saved: Any, grads: tuple[Tensor, ...]) -> Any:
        if saved[0] == "fallback":
            return self._fallback.call(module, saved[1], grads)
        _, inputs, output = saved
        attention = cast(nn.MultiheadAttention, module)
        q_in, k_in, v_in = (_batch_first(attention, t) for t in inputs)
        delta = _batch_first(attention, grads[0])
        batch, length, embed = q_in.shape
        heads = attention.num_heads
        weight = attention.in_proj_weight.detach()
        in_bias = attention.in_proj_bias
        bias = in_bias.detach() if in_bias is not None else None
        w_blocks = weight.chunk(3)
        b_blocks = bias.chunk(3) if bias is not None else (None, None, None)
        with torch.enable_grad():
            projected = [
                F.linear(t, w, b).detach().requires_grad_()
                for t, w, b in zip((q_in, k_in, v_in), w_blocks, b_blocks, strict=True)
            ]
            q, k, v = (
                z.reshape(batch, z.shape[1], heads, embed // heads).transpose(1, 2)
                for z in projected
            )
            core = (
                F.scaled_dot_product_attention(q, k, v)
                .transpose(1, 2)
                .reshape(batch, length, embed)
            )
            out_weight = attention.out_proj.weight.detach()
            out_bias = attention.out_proj.bias
            recomputed = F.linear(
                core.detach(), out_weight, out_bias.detach() if out_bias is not None else None
            )
            self._check_once(module, recomputed, _batch_first(attention, output))
            grads_in = torch.autograd.grad(core, projected, delta @ out_weight)
        projections = {
            name: _LINEAR.call(module, t, (g,))
            for name, t, g in zip(_BLOCKS, (q_in, k_in, v_in), grads_in, strict=True)
        }
        return AttentionCall(projections, _LINEAR.call(module, core.detach(), (delta,)))

    def _check_once(self, module: nn.Module, recomputed: Tensor, expected: Tensor) -> None:
        checked = self._checked.setdefault(module, set())
        if module.training in checked:
            return
        tol = torch.finfo(expected.dtype).eps ** 0.5
        if not torch.allclose(
            recomputed, expected, rtol=tol, atol=tol * float(expected.abs().max())
        ):
            raise UnsupportedModelError(
                "the MultiheadAttention rule does not reproduce this module's output; "
                "use route='generic'"
            )
        checked.add(module.training)

    # ------------------------------------------------------------------ the Linear views

    @staticmethod
    def _block(params: Params, index: int) -> Params:
        """The q (0), k (1) or v (2) block of ``in_proj_*`` as a Linear's weight and bias."""
        out = {}
        if "in_proj_weight" in params:
            out["weight"] = params["in_proj_weight"].chunk(3)[index]
        if "in_proj_bias" in params:
            out["bias"] = params["in_proj_bias"].chunk(3)[index]
        return out

    @staticmethod
    def _out(params: Params) -> Params:
        return {
            local: params[f"out_proj.{local}"]
            for local in ("weight", "bias")
            if f"out_proj.{local}" in params
        }

    def jvp(self, module: nn.Module, call: Any, v: Params) -> Tensor:
        if isinstance(call, FallbackCall):
            return self._fallback.jvp(module, call, v)
        total = _LINEAR.jvp(module, call.out, self._out(v))
        for index, name in enumerate(_BLOCKS):
            total = total + _LINEAR.jvp(module, call.projections[name], self._block(v, index))
        return total

    def vjp(self, module: nn.Module, call: Any, w: Tensor, out: Params, accumulate: bool) -> None:
        if isinstance(call, FallbackCall):
            self._fallback.vjp(module, call, w, out, accumulate)
            return
        _LINEAR.vjp(module, call.out, w, self._out(out), accumulate)
        for index, name in enumerate(_BLOCKS):
            _LINEAR.vjp(module, call.projections[name], w, self._block(out, index), accumulate)

    def per_sample(self, module: nn.Module, call: Any, names: list[str]) -> Params:
        if isinstance(call, FallbackCall):
            return self._fallback.per_sample(module, call, names)
        rows = {}
        blocks = [
            _LINEAR.per_sample(module, call.projections[n], ["weight", "bias"]) for n in _BLOCKS
        ]
        out = _LINEAR.per_sample(module, call.out, ["weight", "bias"])
        if "in_proj_weight" in names:
            rows["in_proj_weight"] = torch.cat([b["weight"] for b in blocks], 1)
        if "in_proj_bias" in names:
            rows["in_proj_bias"] = torch.cat([b["bias"] for b in blocks], 1)
        for local in ("weight", "bias"):
            if f"out_proj.{local}" in names:
                rows[f"out_proj.{local}"] = out[local]
        return rows
