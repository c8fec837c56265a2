"""Callbacks: what a training loop calls at the points where instruments hook in.

:class:`~sgdgeom.train.Trainer` calls them before and after each step, after backward (the
gradients are there) and at the end of each epoch (a callback may add its own named
metrics to the epoch's record). The monitors of :mod:`sgdgeom.monitors` are callbacks;
they depend on this module, never on the loop itself, so each works in any loop that calls
the same hooks (and the Lightning callbacks of :mod:`sgdgeom.integrations.lightning` wrap
them). What a callback may read of the loop is :class:`Loop`, a protocol that
:class:`~sgdgeom.train.Trainer` satisfies.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["Callback", "Loop"]


class Loop(Protocol):
    """What a callback may read of the training loop that calls it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch_size: int
    epoch: int  # epochs completed
    step: int  # steps completed in all


class Callback:
    """Hooks into a training loop. Override what you need; all default to doing nothing.

    A callback that keeps state across epochs returns it from :meth:`state_dict`, so that it
    is saved in the checkpoint and restored on resume.
    """

    def on_train_begin(self, trainer: Loop) -> None:
        """Before the first epoch (also after a resume)."""

    def on_step_begin(self, trainer: Loop, x: Tensor, y: Tensor) -> None:
        """Before the forward pass of a step."""

    def on_after_backward(self, trainer: Loop, x: Tensor, y: Tensor, loss: Tensor) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: gradients are populated."""

    def on_step_end(self, trainer: Loop, x: Tensor, y: Tensor, loss: Tensor) -> None:
        """After ``optimizer.step()``."""

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        """After evaluation; add named entries to ``metrics`` to have them logged."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
