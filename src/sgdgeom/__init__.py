"""sgdgeom: the geometry of SGD noise in weight space.

Fioresi, Chaudhari, Soatto, *A geometric interpretation of stochastic gradient descent
using diffusion metrics* (2020), and Musso, *Partial local entropy and anisotropy in deep
weight spaces*. The public API is listed in ``__all__``, grouped by concept.
"""

from sgdgeom.diffusion import DiffusionMatrix, LayerBlock, LayerTrace
from sgdgeom.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    InputError,
    MissingExtraError,
    NonFiniteLossError,
    SgdgeomError,
    UnsupportedModelError,
)
from sgdgeom.metric import DiffusionMetric
from sgdgeom.monitors import LayerTemperature
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.optim.local_entropy import PartialLocalEntropy
from sgdgeom.params import ParamSpace
from sgdgeom.rbm import RBM

__version__ = "0.1.0"

__all__ = [
    # parameter space
    "ParamSpace",
    # the diffusion matrix (F2, F3)
    "DiffusionMatrix",
    "LayerBlock",
    "LayerTrace",
    # the diffusion metric (F6) and its gradient descent (F10)
    "DiffusionMetric",
    "DiffusionMetricSGD",
    # layer temperatures (M2)
    "LayerTemperature",
    # partial local entropy (M22, M23)
    "PartialLocalEntropy",
    # restricted Boltzmann machines (poster outlook)
    "RBM",
    # errors
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "InputError",
    "MissingExtraError",
    "NonFiniteLossError",
    "SgdgeomError",
    "UnsupportedModelError",
]
