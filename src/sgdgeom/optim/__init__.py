"""Optimizers and training losses: the diffusion-metric gradient descent of Fioresi et al.
(F10), Musso's partial local entropy (M22, M23), and the baselines they are compared with.

Importing this package registers every built-in optimizer (:data:`OPTIMIZERS`) and training
loss (:data:`LOSSES`): one import line per module below.
"""

from sgdgeom.optim import baselines, entropy_sgd, lion  # noqa: F401 (registrations)
from sgdgeom.optim.diffusion_sgd import DiffusionMetricSGD
from sgdgeom.optim.local_entropy import PartialLocalEntropy
from sgdgeom.optim.objectives import LOSSES, LossOptions, loss_options, register_loss
from sgdgeom.optim.registry import (
    OPTIMIZERS,
    OptimizerOptions,
    optimizer_options,
    register_optimizer,
)

__all__ = [
    # the optimizers and losses of the papers
    "DiffusionMetricSGD",
    "PartialLocalEntropy",
    # what a config can name
    "LOSSES",
    "OPTIMIZERS",
    "LossOptions",
    "OptimizerOptions",
    "loss_options",
    "optimizer_options",
    "register_loss",
    "register_optimizer",
]
