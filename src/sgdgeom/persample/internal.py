"""Passes that sgdgeom runs through a model itself are not the training loop's.

A :class:`~sgdgeom.persample.recorder.LoopRecorder` records every forward and backward of its
model. The library's own passes (a :class:`~sgdgeom.diffusion.DiffusionMatrix` built during
training, the ``torch.func`` products of a layer rule inside an optimizer step) run inside
:func:`internal_passes`, and recorders ignore them, so they never leak into a step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["in_internal_pass", "internal_passes"]

_STATE = threading.local()


@contextlib.contextmanager
def internal_passes() -> Iterator[None]:
    """Within this context, recorders neither record nor fuse."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def in_internal_pass() -> bool:
    """Whether the current thread runs one of sgdgeom's own passes."""
    return getattr(_STATE, "depth", 0) > 0
