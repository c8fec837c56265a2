"""The update direction of ``torch.optim.SGD``, shared by the optimizers built on it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["heavy_ball"]


def heavy_ball(
    direction: Tensor, weights: Tensor, group: dict[str, Any], state: dict[str, Any]
) -> Tensor:
    """``direction`` (a gradient, shaped like ``weights``) with coupled weight decay, then
    heavy-ball momentum with dampening and optional Nesterov, exactly as torch.optim.SGD:
    b ← μ b + (1 − τ) d, and d ← d + μ b (Nesterov) or b. ``state`` keeps the buffer."""
    if group["weight_decay"]:
        direction = direction.add(weights, alpha=group["weight_decay"])
    if group["momentum"]:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = direction.clone()
        else:
            buf.mul_(group["momentum"]).add_(direction, alpha=1 - group.get("dampening", 0.0))
        direction = direction.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    return direction
