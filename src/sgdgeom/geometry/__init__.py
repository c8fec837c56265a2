"""The geometry of the diffusion metric :math:`g = I + \\varepsilon D` (Fioresi et al.,
eq. 4-12), one concept per module:

- :mod:`~sgdgeom.geometry.connection`: the Christoffel symbols (F4, F5, F7);
- :mod:`~sgdgeom.geometry.flows`: gradient and metric flows (F10), geodesics (F8), and the
  terms the reduction between them drops;
- :mod:`~sgdgeom.geometry.current`: the steady state's current (F12) and the curl of
  ``∇_D f`` (F11);
- :mod:`~sgdgeom.geometry.fields`: per-sample gradients and ``∇_D f`` as functions of the
  point;
- :mod:`~sgdgeom.geometry.simulators`: SGD ensembles and the Chaudhari–Soatto SDE.
"""

from sgdgeom.geometry.connection import christoffel, christoffel_contract
from sgdgeom.geometry.current import Curl, Current, curl, current
from sgdgeom.geometry.fields import metric_gradient_field, per_sample_gradient_function
from sgdgeom.geometry.flows import (
    RESIDUAL_LEVELS,
    Trajectory,
    geodesic,
    gradient_flow,
    metric_flow,
    residuals,
)
from sgdgeom.geometry.simulators import chaudhari_soatto_sde, sgd_ensemble
from sgdgeom.params import set_parameters

__all__ = [
    # the connection
    "christoffel",
    "christoffel_contract",
    # flows and geodesics
    "RESIDUAL_LEVELS",
    "Trajectory",
    "geodesic",
    "gradient_flow",
    "metric_flow",
    "residuals",
    # the steady state
    "Curl",
    "Current",
    "curl",
    "current",
    # fields and simulators
    "chaudhari_soatto_sde",
    "metric_gradient_field",
    "per_sample_gradient_function",
    "set_parameters",
    "sgd_ensemble",
]
