r"""``nn.Linear`` on inputs of any leading shape ``(B, *, in)``.

The per-sample gradient sums over positions t (a sequence, or the calls of a reused layer):
:math:`g_i = \sum_t \delta_{it} a_{it}^\top` for the weight and :math:`\sum_t \delta_{it}`
for the bias, with :math:`a_{it}` the input and :math:`\delta_{it} = \partial f_i/\partial
z_{it}` the output gradient (``docs/design.md``). Hence

- ``jvp``: :math:`g_i\cdot v = \sum_t \delta_{it}^\top V a_{it} + \delta_{it}\cdot v_b`;
- ``vjp``: :math:`\sum_i w_i g_i = \Delta^\top \mathrm{diag}(w) A`, one weight-gradient
  sized matmul;
- ``gram``: :math:`g_i\cdot g_j = \sum_{t,s} (a_{it}\cdot a_{js})(\delta_{it}\cdot
  \delta_{js})` (+ :math:`(\sum_t\delta_{it})\cdot(\sum_s\delta_{js})` for the bias), used
  when :math:`T^2(\text{in}+\text{out}) \le \text{in}\cdot\text{out}`, else rows are
  materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgdgeom.persample.layers.registry import LayerRule, Params, register_rule, write

__all__ = ["LinearCall", "LinearRule"]


@dataclass
class LinearCall:
    """``inputs (b, T, in)`` and output gradients ``grads (b, T, out)``; ``T = 1`` for
    ordinary 2-D input."""

    inputs: Tensor
    grads: Tensor


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Exact per-sample products of ``nn.Linear`` (and subclasses that keep its forward)."""

    def call(self, module: nn.Module, saved: Tensor, grads: tuple[Tensor, ...]) -> LinearCall:
        a, g = saved, grads[0]
        return LinearCall(a.reshape(len(a), -1, a.shape[-1]), g.reshape(len(g), -1, g.shape[-1]))

    def merge(self, module: nn.Module, calls: list[LinearCall]) -> list[LinearCall]:
        if len(calls) == 1:
            return calls
        return [
            LinearCall(
                torch.cat([c.inputs for c in calls], 1), torch.cat([c.grads for c in calls], 1)
            )
        ]

    def jvp(self, module: nn.Module, call: LinearCall, v: Params) -> Tensor:
        a, g = call.inputs, call.grads
        out = torch.zeros(len(a), dtype=g.dtype, device=g.device)
        if "weight" in v:
            if a.shape[1] == 1:  # plain (b, in) input: 2-D matmuls are fastest
                out = ((a[:, 0] @ v["weight"].T) * g[:, 0]).sum(1)
            else:
                out = torch.einsum("nto,nto->n", a @ v["weight"].T, g)
        if "bias" in v:
            out = out + g.sum(1) @ v["bias"]
        return out

    def vjp(
        self, module: nn.Module, call: LinearCall, w: Tensor, out: Params, accumulate: bool
    ) -> None:
        weighted = call.grads * w[:, None, None]
        if "weight" in out:
            deltas, inputs = weighted.flatten(0, 1).T, call.inputs.flatten(0, 1)
            if accumulate:
                out["weight"].addmm_(deltas, inputs)
            else:
                torch.mm(deltas, inputs, out=out["weight"])
        if "bias" in out:
            write(out["bias"], weighted.sum((0, 1)), accumulate)

    def jvp_batch(self, module: nn.Module, call: LinearCall, v: Params) -> Tensor:
        """``m`` vectors in one matmul: ``(A V_kᵀ) ⊙ Δ`` summed over outputs and positions."""
        a, g = call.inputs, call.grads
        out = torch.zeros(
            len(a), 0 if not v else len(next(iter(v.values()))), dtype=g.dtype, device=g.device
        )
        if "weight" in v:
            m, fan_out, fan_in = v["weight"].shape
            z = a @ v["weight"].reshape(m * fan_out, fan_in).T  # (b, T, m·out)
            if a.shape[1] == 1:  # one batched matmul over samples, no copy
                out = torch.bmm(z.view(len(a), m, fan_out), g[:, 0, :, None])[..., 0]
            else:
                out = torch.einsum("ntmo,nto->nm", z.view(*a.shape[:2], m, fan_out), g)
        if "bias" in v:
            out = out + g.sum(1) @ v["bias"].T
        return out

    def vjp_batch(self, module: nn.Module, call: LinearCall, w: Tensor, names: list[str]) -> Params:
        """``m`` weight vectors in one matmul: ``[Δ ⊙ w_k]ᵀ A`` stacked over k."""
        m, (n, t, fan_out) = w.shape[1], call.grads.shape
        out = {}
        if "weight" in names:
            weighted = (call.grads[:, :, None, :] * w[:, None, :, None]).reshape(n * t, m * fan_out)
            out["weight"] = (weighted.T @ call.inputs.flatten(0, 1)).view(m, fan_out, -1)
        if "bias" in names:
            out["bias"] = w.T @ call.grads.sum(1)
        return out

    def per_sample(self, module: nn.Module, call: LinearCall, names: list[str]) -> Params:
        rows = {}
        if "weight" in names:
            rows["weight"] = torch.einsum("nto,nti->noi", call.grads, call.inputs).flatten(1)
        if "bias" in names:
            rows["bias"] = call.grads.sum(1)
        return rows

    def has_ghost_gram(self, module: nn.Module, call: LinearCall) -> bool:
        t, fan_in, fan_out = call.inputs.shape[1], call.inputs.shape[2], call.grads.shape[2]
        return t == 1 or t * t * (fan_in + fan_out) <= fan_in * fan_out

    def gram(
        self, module: nn.Module, call_i: LinearCall, call_j: LinearCall, names: list[str]
    ) -> Tensor | None:
        if not (self.has_ghost_gram(module, call_i) and self.has_ghost_gram(module, call_j)):
            return None
        if call_i.inputs.shape[1] == call_j.inputs.shape[1] == 1:
            delta = call_i.grads[:, 0] @ call_j.grads[:, 0].T
            if "weight" not in names:
                return delta
            act = call_i.inputs[:, 0] @ call_j.inputs[:, 0].T
            return delta * (act + 1) if "bias" in names else delta * act
        # g_i·g_j = Σ_{t,s} (a_it·a_js)(δ_it·δ_js): the sample (i, j), the position (t, s)
        # and the feature (k, o) letters all differ, even where the sizes coincide
        out = torch.zeros(
            len(call_i.grads), len(call_j.grads), dtype=call_i.grads.dtype,
            device=call_i.grads.device,
        )  # fmt: skip
        if "weight" in names:
            delta = torch.einsum("ito,jso->itjs", call_i.grads, call_j.grads)
            act = torch.einsum("itk,jsk->itjs", call_i.inputs, call_j.inputs)
            out = (delta * act).sum((1, 3))
        if "bias" in names:
            out = out + call_i.grads.sum(1) @ call_j.grads.sum(1).T
        return out

    def costs(
        self, module: nn.Module, call: LinearCall, size: int, numel: int
    ) -> tuple[float, float]:
        """A product is one ``(b T) x in x out`` matmul; the ghost Gram ``b² T² (in + out)``
        (else the rows: ``b T in out`` to form them, ``b² numel`` to multiply them)."""
        t, fan_in, fan_out = call.inputs.shape[1], call.inputs.shape[2], call.grads.shape[2]
        product = float(size * t * fan_in * fan_out)
        if self.has_ghost_gram(module, call):
            return product, float(size * size * t * t * (fan_in + fan_out))
        return product, product + float(size * size * numel)

    def square_sum(self, module: nn.Module, call: LinearCall, names: list[str]) -> Params | None:
        """``Σ_i (δ_i a_iᵀ)²= (Δ ⊙ Δ)ᵀ (A ⊙ A)`` on non-sequence inputs."""
        if call.inputs.shape[1] != 1:
            return None
        delta_sq = call.grads[:, 0].square()
        squares = {}
        if "weight" in names:
            squares["weight"] = delta_sq.T @ call.inputs[:, 0].square()
        if "bias" in names:
            squares["bias"] = delta_sq.sum(0)
        return squares

    def sq_norms(self, module: nn.Module, call: LinearCall, names: list[str]) -> Params | None:
        """``‖δ_i‖² ‖a_i‖²`` on non-sequence inputs; on sequences the per-sample Gram
        trick, ``Σ_{t,s} (a_it·a_is)(δ_it·δ_is)``, where its ``T² (in + out)`` beats the
        rows' ``T in out`` (else None: the rows)."""
        a, g = call.inputs, call.grads
        t, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
        norms = {}
        if t == 1:
            delta = g[:, 0].square().sum(1)
            if "weight" in names:
                norms["weight"] = delta * a[:, 0].square().sum(1)
        elif t * (fan_in + fan_out) <= fan_in * fan_out:
            if "weight" in names:  # each sample's (T, T) Gram matrices, contracted
                norms["weight"] = (
                    torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                ).sum((1, 2))
        else:
            return None
        if "bias" in names:
            norms["bias"] = g.sum(1).square().sum(1)
        return norms
