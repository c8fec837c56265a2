r"""Lion (Chen et al., *Symbolic Discovery of Optimization Algorithms*, NeurIPS 2023,
Algorithm 2): a sign-momentum baseline.

For each parameter :math:`x` with gradient :math:`g` and momentum :math:`m` (zero at first):

.. math::

    u = \operatorname{sign}(\beta_1 m + (1 - \beta_1) g),\qquad
    x \leftarrow x - \eta\,(u + \lambda x),\qquad
    m \leftarrow \beta_2 m + (1 - \beta_2) g,

with the paper's defaults :math:`\beta_1 = 0.9`, :math:`\beta_2 = 0.99` and decoupled
weight decay :math:`\lambda`. Every coordinate moves by exactly :math:`\eta` (plus decay)
each step, so its learning rate is usually 3–10x smaller than AdamW's.

Examples:
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = Lion([w], lr=0.1)
    >>> (w ** 2).sum().backward()
    >>> opt.step()
    >>> w.detach()
    tensor([ 0.9000, -1.9000])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from sgdgeom.errors import InputError
from sgdgeom.optim.registry import OptimizerOptions, register_optimizer

__all__ = ["Lion", "LionOptions"]


class Lion(torch.optim.Optimizer):
    """Lion as a ``torch.optim.Optimizer`` (module doc).

    Args:
        params: parameters or parameter groups.
        lr: η.
        betas: ``(β₁, β₂)``: the interpolation of the update and the decay of the momentum.
        weight_decay: λ, decoupled (multiplied by η, as AdamW's).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise InputError(f"Invalid learning rate: {lr}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise InputError(f"Invalid betas: {betas}; two numbers in [0, 1)")
        if weight_decay < 0:
            raise InputError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step on every parameter with a gradient (one multi-tensor kernel per
        operation); an optional closure re-evaluates the loss, as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            momenta = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            beta1, beta2 = group["betas"]
            update = torch._foreach_mul(momenta, beta1)
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_mul_(momenta, beta2)
            torch._foreach_add_(momenta, grads, alpha=1 - beta2)
        return loss


@register_optimizer("lion")
class LionOptions(OptimizerOptions):
    """:class:`Lion` in a config (``betas``, default the paper's ``[0.9, 0.99]``)."""

    uses_momentum: ClassVar[bool] = False
    name: Literal["lion"] = "lion"
    betas: tuple[float, float] = Field((0.9, 0.99), strict=False)  # YAML gives a list

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return Lion(
            model.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
