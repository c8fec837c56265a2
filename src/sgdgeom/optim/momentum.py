"""The update direction of ``torch.optim.SGD``, shared by the optimizers built on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["heavy_ball"]


def heavy_ball(
    directions: list[Tensor],
    weights: list[Tensor],
    group: dict[str, Any],
    states: list[dict[str, Any]],
) -> list[Tensor]:
    """``directions`` (gradients, each shaped like its weights) with coupled weight decay,
    then heavy-ball momentum with dampening and optional Nesterov, exactly as
    torch.optim.SGD: b ← μ b + (1 − τ) d, and d ← d + μ b (Nesterov) or b. Each ``states``
    entry keeps its tensor's buffer. One multi-tensor (``_foreach``) kernel per operation
    for the whole list, as torch.optim does: on an accelerator a small step is
    launch-bound."""
    if group["weight_decay"]:
        directions = list(torch._foreach_add(directions, weights, alpha=group["weight_decay"]))
    if not group["momentum"]:
        return directions
    old = [i for i, state in enumerate(states) if state.get("momentum_buffer") is not None]
    if old:
        kept = [states[i]["momentum_buffer"] for i in old]
        torch._foreach_mul_(kept, group["momentum"])
        torch._foreach_add_(
            kept, [directions[i] for i in old], alpha=1 - group.get("dampening", 0.0)
        )
    for direction, state in zip(directions, states, strict=True):
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = direction.clone()
    buffers: list[Tensor] = [state["momentum_buffer"] for state in states]
    if group["nesterov"]:
        return list(torch._foreach_add(directions, buffers, alpha=group["momentum"]))
    return buffers
