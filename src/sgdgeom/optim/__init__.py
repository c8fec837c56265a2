"""Optimizers: the diffusion-metric gradient descent of Fioresi et al. (F10)."""

from sgdgeom.optim.diffusion_sgd import DiffusionMetricSGD

__all__ = ["DiffusionMetricSGD"]
