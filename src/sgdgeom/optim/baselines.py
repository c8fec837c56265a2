"""The baselines every comparison runs against, as a config names them: torch's SGD, Adam
and AdamW, and SAM and ASAM from the pytorch-optimizer package (``pip install
'sgdgeom[baselines]'``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from sgdgeom.extras import require
from sgdgeom.optim.registry import OptimizerOptions, register_optimizer

__all__ = ["ASAMOptions", "AdamOptions", "AdamWOptions", "SAMOptions", "SGDOptions"]


@register_optimizer("sgd")
class SGDOptions(OptimizerOptions):
    """``torch.optim.SGD``: plain, heavy-ball or Nesterov momentum, weight decay."""

    name: Literal["sgd"] = "sgd"

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), **self.sgd_arguments())


@register_optimizer("adam")
class AdamOptions(OptimizerOptions):
    """``torch.optim.Adam`` (L2 weight decay), with torch's betas."""

    uses_momentum: ClassVar[bool] = False
    name: Literal["adam"] = "adam"

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@register_optimizer("adamw")
class AdamWOptions(OptimizerOptions):
    """``torch.optim.AdamW`` (decoupled weight decay), with torch's betas."""

    uses_momentum: ClassVar[bool] = False
    name: Literal["adamw"] = "adamw"

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@register_optimizer("sam")
class SAMOptions(OptimizerOptions):
    """SAM (Foret et al. 2021) from pytorch-optimizer over torch's SGD; ``rho`` defaults to
    0.05, the value of its paper for CIFAR. Its ``step`` re-evaluates the loss, so the
    optimizer is marked as needing a closure (:class:`~sgdgeom.train.Trainer`)."""

    name: Literal["sam"] = "sam"
    rho: float = Field(0.05, gt=0)
    adaptive: ClassVar[bool] = False

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        SAM = require("pytorch_optimizer", f"optimizer {self.name}").SAM
        optimizer = SAM(
            model.parameters(),
            base_optimizer=torch.optim.SGD,
            rho=self.rho,
            adaptive=self.adaptive,
            **self.sgd_arguments(),
        )
        optimizer.requires_closure = True
        return optimizer


@register_optimizer("asam")
class ASAMOptions(SAMOptions):
    """ASAM (Kwon et al. 2021), SAM's adaptive form; ``rho`` defaults to 0.5, its paper's."""

    name: Literal["asam"] = "asam"  # type: ignore[assignment]
    rho: float = Field(0.5, gt=0)
    adaptive: ClassVar[bool] = True
