"""The optimizers a config can name: each an :class:`OptimizerOptions` model that builds it.

A config's ``optimizer:`` section is validated as the options model registered under its
``name`` (:func:`~sgdgeom.registry.validate_named`), and :meth:`OptimizerOptions.build`
makes the optimizer over a model. Adding an optimizer is one module with its class, its
options model and ``@register_optimizer("name")``, imported by :mod:`sgdgeom.optim`
(``docs/design.md`` shows it for Lion).

Every optimizer takes ``lr``, ``weight_decay`` and, where it has heavy-ball momentum
(``uses_momentum``), ``momentum`` and ``nesterov``; a momentum given to one without it is
refused rather than ignored.

Examples:
    >>> from torch import nn
    >>> options = optimizer_options({"name": "sgd", "lr": 0.1, "momentum": 0.9})
    >>> type(options.build(nn.Linear(2, 2))).__name__
    'SGD'
    >>> optimizer_options({"name": "adamw", "lr": 1e-3, "momentum": 0.9})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for AdamWOptions
      Value error, adamw has no heavy-ball momentum: drop momentum and nesterov (got 0.9) ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import Field, model_validator
from torch import nn

from sgdgeom.registry import Options, Registry, validate_named

__all__ = ["OPTIMIZERS", "OptimizerOptions", "optimizer_options", "register_optimizer"]


class OptimizerOptions(Options):
    """The options every optimizer takes; a registered subclass adds its own."""

    #: whether the optimizer has heavy-ball momentum (``momentum``, ``nesterov``)
    uses_momentum: ClassVar[bool] = True

    name: str
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _momentum_where_it_exists(self) -> OptimizerOptions:
        if not self.uses_momentum and (self.momentum or self.nesterov):
            raise ValueError(
                f"{self.name} has no heavy-ball momentum: drop momentum and nesterov "
                f"(got {self.momentum}{', nesterov' if self.nesterov else ''})"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self

    def sgd_arguments(self) -> dict[str, Any]:
        """``lr``, ``momentum``, ``weight_decay`` and ``nesterov``, as ``torch.optim.SGD``
        takes them."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
        }

    def alongside(self, loss_is_plain: bool, reads_grad: bool) -> OptimizerOptions:
        """These options beside a config's loss (``loss_is_plain``: one forward and backward
        of the per-sample losses a step) and monitors (``reads_grad``: one reads the weights'
        ``.grad`` after backward); an optimizer that cannot work beside them raises
        ``ValueError``, one that adapts returns adapted options. Default: unchanged."""
        return self

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters."""
        raise NotImplementedError


OPTIMIZERS: Registry[type[OptimizerOptions]] = Registry("optimizer")
"""Optimizer names to their options models."""

OptionsType = TypeVar("OptionsType", bound=type[OptimizerOptions])


def register_optimizer(name: str) -> Callable[[OptionsType], OptionsType]:
    """Class decorator: the options model of the optimizer a config names ``name``."""
    return OPTIMIZERS.decorator(name)


def optimizer_options(data: Any) -> OptimizerOptions:
    """A config's ``optimizer:`` section as its registered options model."""
    return validate_named(OPTIMIZERS, data, base=OptimizerOptions)
