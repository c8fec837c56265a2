"""Per-sample products of the gradients: the machinery beneath every operator of sgdgeom.

How it works, module by module (imports point down this list):

- :mod:`~sgdgeom.persample.losses`: per-sample losses :math:`f_i`, and the check that the
  samples are independent;
- :mod:`~sgdgeom.persample.source`: the data, as a batch or a loader streamed in chunks;
- :mod:`~sgdgeom.persample.base`: the :class:`PerSampleProducts` protocol (``G v``,
  ``Gᵀ w``, Gram matrix, squared norms, rows, second-order products);
- :mod:`~sgdgeom.persample.func` and :mod:`~sgdgeom.persample.rows`: the generic routes
  (``torch.func`` for any model; an explicit ``G``);
- :mod:`~sgdgeom.persample.layers`: one rule per layer type and the registry;
- :mod:`~sgdgeom.persample.storage`: where captures live (memory, memory-mapped files);
- :mod:`~sgdgeom.persample.capture`: one forward and backward, captured for the rules,
  with the coverage check;
- :mod:`~sgdgeom.persample.routes`: which route a model takes;
- :mod:`~sgdgeom.persample.distributed`: the products of shards held by several processes;
- :mod:`~sgdgeom.persample.recorder` and :mod:`~sgdgeom.persample.steps`: the captures of
  an ordinary training loop, and the checked products of each of its steps.
"""

from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.capture import (
    CaptureProducts,
    CoverageError,
    Layer,
    capture_chunk,
    check_coverage,
    plan_layers,
)
from sgdgeom.persample.distributed import ShardedProducts
from sgdgeom.persample.func import FuncProducts, jvp_or_double_vjp
from sgdgeom.persample.internal import internal_passes
from sgdgeom.persample.layers import LayerRule, register_rule, rule_for
from sgdgeom.persample.losses import (
    LossSpec,
    PerSampleLoss,
    check_independent_samples,
    per_sample_loss,
)
from sgdgeom.persample.recorder import NoGrad, all_gather
from sgdgeom.persample.routes import ROUTES, Route, make_products, route_of
from sgdgeom.persample.rows import RowProducts
from sgdgeom.persample.source import DataSource
from sgdgeom.persample.steps import LossReduction, StepCapture, distributed
from sgdgeom.persample.storage import CacheMode

__all__ = [
    # losses and data
    "DataSource",
    "LossSpec",
    "PerSampleLoss",
    "check_independent_samples",
    "per_sample_loss",
    # the protocol and its routes
    "PerSampleProducts",
    "CaptureProducts",
    "FuncProducts",
    "RowProducts",
    "ShardedProducts",
    "ROUTES",
    "Route",
    "CacheMode",
    "make_products",
    "route_of",
    "jvp_or_double_vjp",
    # the capture and the layer rules
    "CoverageError",
    "Layer",
    "LayerRule",
    "capture_chunk",
    "check_coverage",
    "plan_layers",
    "register_rule",
    "rule_for",
    # the steps of a training loop
    "LossReduction",
    "NoGrad",
    "StepCapture",
    "all_gather",
    "distributed",
    "internal_passes",
]
