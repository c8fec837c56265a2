"""Choosing a route for a model: the capture route where it is exact, else torch.func.

A *route* is how the per-sample products are computed (``docs/design.md``, vocabulary):
``"capture"`` (layer rules over one captured forward and backward), ``"generic"``
(``torch.func`` on the whole model) or, for products built from explicit per-sample
gradients, ``"rows"``. The word names nothing else in sgdgeom.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, get_args

from torch import nn

from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.capture import CaptureProducts
from sgdgeom.persample.distributed import ShardedProducts
from sgdgeom.persample.func import FuncProducts
from sgdgeom.persample.losses import LossSpec, check_independent_samples
from sgdgeom.persample.source import DataSource
from sgdgeom.persample.storage import CacheMode

__all__ = ["ROUTES", "Route", "make_products", "route_of"]

Route = Literal["auto", "capture", "generic"]
ROUTES: tuple[str, ...] = get_args(Route)


def make_products(
    model: nn.Module,
    loss_fn: LossSpec,
    data: DataSource,
    *,
    route: Route = "auto",
    cache: CacheMode = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> PerSampleProducts:
    """The products of a model's per-sample gradients on ``data``.

    ``route="capture"``: :class:`~sgdgeom.persample.capture.CaptureProducts` (layer rules,
    with the module-local fallback for modules without one), or an error naming the
    parameter where it cannot be exact (a weight used outside its module).
    ``route="generic"``: :class:`~sgdgeom.persample.func.FuncProducts`, exact for any model.
    ``route="auto"``: the capture route, else the generic one, with a warning that says why.
    Models whose samples are not independent (BatchNorm or Dropout in train mode) are
    refused on every route.
    """
    if route not in ROUTES:
        raise InputError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    check_independent_samples(model)
    if route == "generic":
        return FuncProducts(model, loss_fn, data, progress=progress)
    try:
        return CaptureProducts.from_model(
            model, loss_fn, data, cache=cache, cache_dir=cache_dir, progress=progress
        )
    except UnsupportedModelError as err:
        if route == "capture":
            raise
        warnings.warn(
            f"the capture route is not exact for this model ({err}); using the generic "
            f"torch.func route",
            stacklevel=3,
        )
        return FuncProducts(model, loss_fn, data, progress=progress)


def route_of(products: PerSampleProducts) -> str:
    """``"generic"``, ``"capture"`` or ``"rows"``: the route of these products (that of each
    process's shard for :class:`~sgdgeom.persample.ShardedProducts`)."""
    if isinstance(products, ShardedProducts):
        products = products.local
    if isinstance(products, FuncProducts):
        return "generic"
    return "capture" if isinstance(products, CaptureProducts) else "rows"
