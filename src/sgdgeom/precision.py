r"""Mixed precision: captures in the training loop's dtype, products in float32 or wider.

Under ``torch.autocast`` (or with bfloat16/float16 parameters) a layer's inputs and output
gradients are lower-precision tensors. sgdgeom keeps them so (they are what costs memory
between the forward and the step) and computes with them in the parameter space's dtype,
float32 or wider (:func:`compute_dtype`):

- :func:`upcast` converts a call's lower-precision tensors to it, one chunk at a time, just
  before a rule multiplies them: products, Gram matrices, traces and eigenvalue bounds
  accumulate in float32 although the captures are bfloat16;
- :func:`full_precision` switches autocast off around sgdgeom's own arithmetic (an
  autocast region would otherwise run its float32 matrix products in bfloat16);
  :func:`in_full_precision` does so for every public method of a class (the operators,
  the metric);
- :func:`unit_roundoff` is the precision of what was captured, which sets the tolerance of
  the checks that compare the rules' sums with autograd's gradients (``docs/design.md``,
  "Mixed precision").

Examples:
    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    >>> upcast({"inputs": torch.ones(2, dtype=torch.bfloat16)}, torch.float32)["inputs"].dtype
    torch.float32
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "AUTOCAST_DEVICES",
    "capture_dtype",
    "compute_dtype",
    "full_precision",
    "in_full_precision",
    "map_tensors",
    "unit_roundoff",
    "upcast",
]

T = TypeVar("T")

#: the device types whose autocast state :func:`full_precision` switches off
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Context manager and decorator (``@full_precision()``): autocast off for every device
    type where it is on, so the float32 products inside run in float32 (as
    ``torch.autocast(device, enabled=False)`` does for one device type)."""
    with contextlib.ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if _autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that products with parameters of ``dtype`` run in: float32 or wider
    (bfloat16 and float16 parameters give float32 vectors and products)."""
    return torch.promote_types(dtype, torch.float32)


def in_full_precision(cls: type[T]) -> type[T]:
    """Class decorator: every public method defined in the class body runs under
    :func:`full_precision` (an operator's products, a metric's solves), so a call from
    inside an autocast region computes as one outside it."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, full_precision()(value))
    return cls


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type this build does not know
        return False


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through dicts, lists, tuples and
    dataclasses; a container none of whose tensors changed is returned as it is."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        return value if all(mapped[k] is value[k] for k in value) else mapped
    if isinstance(value, list | tuple):
        items = [map_tensors(v, fn) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in fields(value):
            old = getattr(value, f.name)
            new = map_tensors(old, fn)
            if new is not old:
                changes[f.name] = new
        return replace(value, **changes) if changes else value
    return value


def upcast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a call, a list of calls...) with its floating tensors of lower precision
    than ``dtype`` converted to ``dtype``; integer tensors (token indices) are kept."""
    size = torch.finfo(dtype).bits

    def convert(t: Tensor) -> Tensor:
        if t.is_floating_point() and torch.finfo(t.dtype).bits < size:
            return t.to(dtype)
        return t

    return map_tensors(value, convert)


def capture_dtype(value: Any) -> torch.dtype | None:
    """The lowest-precision floating dtype among the tensors of ``value``, if any."""
    lowest: list[torch.dtype] = []

    def visit(t: Tensor) -> Tensor:
        if t.is_floating_point() and (
            not lowest or torch.finfo(t.dtype).eps > torch.finfo(lowest[0]).eps
        ):
            lowest[:] = [t.dtype]
        return t

    map_tensors(value, visit)
    return lowest[0] if lowest else None


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of rounding one number to ``dtype``
    (``2⁻⁸`` for bfloat16, ``2⁻¹¹`` for float16, ``2⁻²⁴`` for float32)."""
    return torch.finfo(dtype).eps / 2
