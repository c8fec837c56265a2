"""Entropy-SGD (Chaudhari et al., *Entropy-SGD: biasing gradient descent into wide
valleys*, ICLR 2017, Algorithm 1): a baseline for the partial local entropy losses.

No maintained library ships it, so it is written here from the paper. One outer step:

    x' ← x, μ ← x
    for l = 1..L:
        dx' = ∇f(x') − γ (x − x')                      (the local-entropy Langevin drift)
        x'  ← x' − η' dx' + √η' · ε · N(0, I)           (SGLD, thermal noise ε)
        μ   ← (1 − α) μ + α x'
    x ← x − η γ (x − μ)                                 (the local-entropy gradient step)

with the scope γ growing as γ_t = γ (1 + γ₁)^t ("scoping", §4.3 of the paper). The outer
step moves x a fraction ηγ of the way to μ, so η ≈ 1/γ is the natural scale of ``lr``
(ηγ = 1 jumps to the average of the inner chain). Momentum,
Nesterov and weight decay act on the outer gradient γ (x − μ), as in the authors' code.

Each inner step needs the gradient at the current x', so :meth:`EntropySGD.step` takes a
closure. Differences from the paper, stated plainly: the paper draws a fresh minibatch
for every inner step; here the closure re-evaluates the step's own minibatch (the
:class:`~sgdgeom.train.Trainer` passes one), so an epoch costs L times the passes of an
SGD epoch over the same data. The gradient already in ``.grad`` when :meth:`step` is
called (taken at x) serves as the first inner step's, so a step costs L − 1 closure calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from sgdgeom.errors import InputError
from sgdgeom.optim.momentum import heavy_ball
from sgdgeom.optim.registry import OptimizerOptions, register_optimizer

__all__ = ["EntropySGD", "EntropySGDOptions"]


class EntropySGD(torch.optim.Optimizer):
    """Entropy-SGD as a ``torch.optim.Optimizer`` (Chaudhari et al. 2017, Algorithm 1).

    Args:
        params: parameters or parameter groups.
        lr: η, the outer learning rate.
        langevin_lr: η', the inner SGLD step size.
        L: the number of inner Langevin steps per outer step (≥ 1).
        gamma: γ, the initial scope (coupling of x' to x).
        gamma_growth: γ₁; the scope at outer step t is γ (1 + γ₁)^t.
        noise: ε, the thermal noise of the inner SGLD (0 gives plain inner gradient steps).
        alpha: the weight of the exponential average μ of the inner iterates.
        momentum: as in ``torch.optim.SGD``, on the outer gradient.
        nesterov: as in ``torch.optim.SGD``, on the outer gradient.
        weight_decay: as in ``torch.optim.SGD``, on the outer gradient.

    Examples:
        >>> w = torch.nn.Parameter(torch.tensor([2.0]))
        >>> opt = EntropySGD([w], lr=1.0, langevin_lr=0.1, L=5, gamma=0.1, noise=0.0)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> _ = closure()
        >>> _ = opt.step(closure)
        >>> 0.0 < w.item() < 2.0
        True
    """

    requires_closure = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        langevin_lr: float = 0.1,
        L: int = 5,
        gamma: float = 0.03,
        gamma_growth: float = 1e-3,
        noise: float = 1e-4,
        alpha: float = 0.75,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        checks = {
            "lr": lr > 0,
            "langevin_lr": langevin_lr > 0,
            "L": isinstance(L, int) and L >= 1,
            "gamma": gamma > 0,
            "gamma_growth": gamma_growth >= 0,
            "noise": noise >= 0,
            "alpha": 0 < alpha <= 1,
            "momentum": 0 <= momentum < 1,
            "weight_decay": weight_decay >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"EntropySGD: invalid {', '.join(bad)}")
        if nesterov and momentum == 0:
            raise InputError("EntropySGD: nesterov needs momentum > 0")
        defaults = dict(
            lr=lr,
            langevin_lr=langevin_lr,
            L=L,
            gamma=gamma,
            gamma_growth=gamma_growth,
            noise=noise,
            alpha=alpha,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            outer_steps=0,
        )
        super().__init__(params, defaults)

    def _params(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One outer step. ``.grad`` must hold the gradient at the current weights;
        ``closure`` zeroes the gradients, recomputes the loss and calls ``backward``."""
        if closure is None:
            raise InputError("EntropySGD.step needs a closure that re-evaluates the loss")
        pairs = self._params()
        anchor = [p.detach().clone() for _, p in pairs]
        mean = [p.detach().clone() for _, p in pairs]
        loss = None
        for index in range(pairs[0][0]["L"]):
            if index > 0:
                with torch.enable_grad():
                    loss = closure()
            for (group, p), x, mu in zip(pairs, anchor, mean, strict=True):
                gamma = self._scope(group)
                drift = (p.grad if p.grad is not None else torch.zeros_like(p)) - gamma * (x - p)
                p.add_(drift, alpha=-group["langevin_lr"])
                if group["noise"] > 0:
                    p.add_(
                        torch.randn_like(p), alpha=math.sqrt(group["langevin_lr"]) * group["noise"]
                    )
                mu.mul_(1 - group["alpha"]).add_(p, alpha=group["alpha"])
        for (group, p), x, mu in zip(pairs, anchor, mean, strict=True):
            (gradient,) = heavy_ball([self._scope(group) * (x - mu)], [x], group, [self.state[p]])
            p.copy_(x - group["lr"] * gradient)
        for group in self.param_groups:
            group["outer_steps"] += 1
        return loss

    @staticmethod
    def _scope(group: dict[str, Any]) -> float:
        """γ_t = γ (1 + γ₁)^t at the group's outer step t."""
        return group["gamma"] * (1 + group["gamma_growth"]) ** group["outer_steps"]


@register_optimizer("entropy-sgd")
class EntropySGDOptions(OptimizerOptions):
    """:class:`EntropySGD` in a config. Defaults, against Chaudhari et al.'s Algorithm 1
    and the defaults of their public code: ``langevin_lr`` η' = 0.1, ``noise`` ε = 1e-4
    (the thermal noise of the inner SGLD) and ``alpha`` α = 0.75 (the weight of the inner
    iterates' running mean μ) are theirs; ``gamma`` γ₀ = 0.03 and ``gamma_growth`` γ₁ = 1e-3
    where their code has 1e-2 and 0 (scoping, §4.3 of the paper, is off there by default);
    ``L`` = 5 inner steps where their code's default is 0 and their experiments set 5 to 20."""

    name: Literal["entropy-sgd"] = "entropy-sgd"
    L: int = Field(5, ge=1)
    gamma: float = Field(0.03, gt=0)
    gamma_growth: float = Field(1e-3, ge=0)
    langevin_lr: float = Field(0.1, gt=0)
    noise: float = Field(1e-4, ge=0)
    alpha: float = Field(0.75, gt=0, le=1)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return EntropySGD(
            model.parameters(),
            **self.sgd_arguments(),
            L=self.L,
            gamma=self.gamma,
            gamma_growth=self.gamma_growth,
            langevin_lr=self.langevin_lr,
            noise=self.noise,
            alpha=self.alpha,
        )
