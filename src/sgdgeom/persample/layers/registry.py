r"""The layer-rule registry: the one place that maps a module type to its per-sample rule.

A :class:`LayerRule` turns what a module's forward saw (its inputs) and the gradients of the
per-sample losses at its outputs into products with the per-sample gradients of the
module's own parameters: ``jvp`` (:math:`g_i \cdot v`), ``vjp``
(:math:`\sum_i w_i g_i`), ``per_sample`` (rows of G), and optionally the cheaper ``gram``
and ``sq_norms`` (ghost products, ``docs/design.md``). Adding a layer is one file with a rule and
one :func:`register_rule` line; a user registers a rule for their own module the same way.

A module with parameters and no rule (or one its rule declines, e.g. a grouped
convolution) is served by the module-local ``torch.func`` fallback
(:mod:`sgdgeom.persample.layers.fallback`), which owns all the parameters beneath it.

Examples:
    >>> from torch import nn
    >>> type(rule_for(nn.Linear(2, 3))).__name__
    'LinearRule'
    >>> type(rule_for(nn.PReLU())).__name__
    'FallbackRule'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerRule",
    "Params",
    "register_fallback",
    "register_rule",
    "rule_for",
    "write",
]

Params = dict[str, Tensor]


def write(out: Tensor, value: Tensor, accumulate: bool) -> None:
    """``out += value`` or ``out = value``, in place."""
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)


class LayerRule:
    """Per-sample products of one module type's own parameters from one captured call.

    A *call* is what the rule keeps of one forward of the module: :meth:`record` runs in the
    forward hook (on detached tensors), :meth:`call` combines it with the output gradients
    of the *per-sample* losses (not of their mean). Parameters are named locally
    (``"weight"``, ``"bias"``); dicts hold only the trainable ones (``names``).
    """

    #: whether the rule owns the parameters of the module's children too
    recursive = False
    #: whether the capture should form the per-sample rows whenever they fit in memory
    #: (else only where they are smaller than what the call keeps)
    prefer_rows = False

    def supports(self, module: nn.Module) -> str | None:
        """``None`` if the rule is exact for this module, else the reason it is not."""
        return None

    def record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """What to keep of one forward (default: the first input, detached)."""
        return args[0].detach()

    def outputs(self, output: Any) -> tuple[Tensor, ...]:
        """The output tensors whose gradients the rule needs (default: the output)."""
        return (output,)

    def call(self, module: nn.Module, saved: Any, grads: tuple[Tensor, ...]) -> Any:
        """One call's data from the recorded inputs and the outputs' gradients."""
        raise NotImplementedError

    def merge(self, module: nn.Module, calls: list[Any]) -> list[Any]:
        """Several calls of one module in one forward (a reused layer): the per-sample
        gradient is the sum over calls; a rule may merge them into fewer calls."""
        return calls

    def jvp(self, module: nn.Module, call: Any, v: Params) -> Tensor:
        """``(g_i · v)`` over the call's samples: ``(b,)``."""
        raise NotImplementedError

    def vjp(self, module: nn.Module, call: Any, w: Tensor, out: Params, accumulate: bool) -> None:
        """``out[name] (+)= Σ_i w_i g_{i,name}`` for each name in ``out`` (shaped like the
        parameter)."""
        raise NotImplementedError

    def jvp_batch(self, module: nn.Module, call: Any, v: Params) -> Tensor:
        """``(g_i · v_k)`` for ``m`` vectors (``v[name]`` of shape ``(m, *param.shape)``):
        ``(b, m)``. The default takes one :meth:`jvp` per vector."""
        m = len(next(iter(v.values())))
        return torch.stack(
            [self.jvp(module, call, {n: t[k] for n, t in v.items()}) for k in range(m)], 1
        )

    def vjp_batch(self, module: nn.Module, call: Any, w: Tensor, names: list[str]) -> Params:
        """``Σ_i w_ik g_{i,name}`` for ``m`` weight vectors ``w (b, m)``: ``{name: (m,
        *param.shape)}``. The default takes one :meth:`vjp` per vector."""
        shapes = {
            n: p.shape for n, p in module.named_parameters(recurse=self.recursive) if n in names
        }
        out = {n: w.new_empty(w.shape[1], *shape) for n, shape in shapes.items()}
        for k in range(w.shape[1]):
            self.vjp(module, call, w[:, k].contiguous(), {n: t[k] for n, t in out.items()}, False)
        return out

    def per_sample(self, module: nn.Module, call: Any, names: list[str]) -> Params:
        """The per-sample gradients ``(b, numel)`` of each parameter in ``names``."""
        raise NotImplementedError

    def gram(self, module: nn.Module, call_i: Any, call_j: Any, names: list[str]) -> Tensor | None:
        """``g_i · g_j`` over the module's ``names``, ``(b_i, b_j)``, by a cheaper formula
        than materialising rows; ``None`` if there is none."""
        return None

    def has_ghost_gram(self, module: nn.Module, call: Any) -> bool:
        """Whether :meth:`gram` has a cheaper formula for this call than materialised rows."""
        return False

    def sq_norms(self, module: nn.Module, call: Any, names: list[str]) -> Params | None:
        """``‖g_{i,name}‖²``, ``(b,)`` per name, by a cheaper formula; ``None`` if none."""
        return None

    def square_sum(self, module: nn.Module, call: Any, names: list[str]) -> Params | None:
        """``Σ_i g_{i,name} ⊙ g_{i,name}`` shaped like each parameter in ``names``, by a
        cheaper formula than materialising rows; ``None`` if none."""
        return None

    def costs(self, module: nn.Module, call: Any, size: int, numel: int) -> tuple[float, float]:
        """Multiply-adds of one :meth:`jvp` (or :meth:`vjp`) of a call over ``size`` samples
        and of its part of the Gram matrix with itself, for the ``numel`` trainable
        scalars: by default those of materialised rows, ``b · numel`` and ``b² · numel``."""
        return float(size * numel), float(size * size * numel)


_RULES: dict[type[nn.Module], LayerRule] = {}
_FALLBACK: list[LayerRule] = []


def register_rule(*types: type[nn.Module]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: serve modules of these types (and of subclasses that keep their
    ``forward``) with an instance of the rule."""

    def decorate(cls: type[LayerRule]) -> type[LayerRule]:
        for module_type in types:
            _RULES[module_type] = cls()
        return cls

    return decorate


def register_fallback(cls: type[LayerRule]) -> type[LayerRule]:
    """Class decorator: the rule for parametrised modules that no other rule serves."""
    _FALLBACK[:] = [cls()]
    return cls


def rule_for(module: nn.Module) -> LayerRule:
    """The rule for a module: its type's, else that of the nearest base class whose
    ``forward`` it inherits unchanged, else the fallback (also where the rule declines)."""
    for base in type(module).__mro__:
        rule = _RULES.get(base)
        if rule is None:
            continue
        if type(module).forward is getattr(base, "forward", None) and rule.supports(module) is None:
            return rule
        break
    return _FALLBACK[0]
