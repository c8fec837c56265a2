"""Optimizers and training losses: the diffusion-metric gradient descent of Fioresi et al.
(F10) and Musso's partial local entropy (M22, M23)."""

from sgdgeom.optim.diffusion_sgd import DiffusionMetricSGD
from sgdgeom.optim.local_entropy import PartialLocalEntropy

__all__ = ["DiffusionMetricSGD", "PartialLocalEntropy"]
