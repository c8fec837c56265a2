"""The training losses a config can name: each a :class:`LossOptions` model that makes the
step's objective.

An *objective* is ``(model, x, y) -> (loss, logits)`` for one minibatch: what
:class:`~sgdgeom.train.Trainer` backpropagates, and the logits it scores. A config's
``loss:`` section is validated as the options model registered under its ``name``;
:meth:`LossOptions.objective` makes the objective for a model. ``cross_entropy`` is the
plain loss; ``pla`` and ``plea`` (:mod:`sgdgeom.optim.local_entropy`) smooth it. Adding a
loss is one module with its options model and ``@register_loss("name")``, imported by
:mod:`sgdgeom.optim`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

from sgdgeom.registry import Options, Registry, validate_named

__all__ = [
    "LOSSES",
    "CrossEntropyOptions",
    "LossOptions",
    "Objective",
    "cross_entropy_objective",
    "loss_options",
    "register_loss",
]

Objective = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def cross_entropy_objective(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The plain objective: the mean cross-entropy of the minibatch, and its logits."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


class LossOptions(Options):
    """The options of a training loss; a registered subclass adds its own."""

    #: whether a step is one forward and backward of the per-sample losses (what an
    #: optimizer that reads per-sample gradients, DiffusionMetricSGD, needs)
    plain: ClassVar[bool] = True

    name: str

    def objective(self, model: nn.Module) -> Objective:
        """The step's objective for ``model``."""
        raise NotImplementedError


LOSSES: Registry[type[LossOptions]] = Registry("loss")
"""Training-loss names to their options models."""

OptionsType = TypeVar("OptionsType", bound=type[LossOptions])


def register_loss(name: str) -> Callable[[OptionsType], OptionsType]:
    """Class decorator: the options model of the training loss a config names ``name``."""
    return LOSSES.decorator(name)


def loss_options(data: Any) -> LossOptions:
    """A config's ``loss:`` section as its registered options model (``cross_entropy`` when
    it names none)."""
    return validate_named(LOSSES, data, base=LossOptions, default="cross_entropy")


@register_loss("cross_entropy")
class CrossEntropyOptions(LossOptions):
    """The plain cross-entropy of the minibatch."""

    name: Literal["cross_entropy"] = "cross_entropy"

    def objective(self, model: nn.Module) -> Objective:
        return cross_entropy_objective
