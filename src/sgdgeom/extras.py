"""Optional dependencies: the core needs torch, numpy, scipy and a few small packages; the
rest comes with an extra (``pip install 'sgdgeom[data]'``), and a missing one is named.

Examples:
    >>> require("math", "a doctest").sqrt(4.0)
    2.0
    >>> require("no_such_module_here", "the demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sgdgeom.errors.MissingExtraError: the demo needs no_such_module_here, which is not installed...
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from sgdgeom.errors import MissingExtraError

__all__ = ["EXTRAS", "numba_parallel", "numba_threads", "require"]

EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("data", "scikit-learn"),
    "mlxtend": ("data", "mlxtend"),
    "mnist1d": ("data", "mnist1d"),
    "kornia": ("augment", "kornia"),
    "pytorch_optimizer": ("baselines", "pytorch-optimizer"),
    "ray": ("ray", "ray"),
    "lightning": ("lightning", "lightning"),
    "numba": ("fast", "numba"),
    "torch.utils.tensorboard": ("", "tensorboard"),
}
"""Top-level module -> (the sgdgeom extra that installs it, its package name)."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`MissingExtraError` saying which extra to
    install and why (``purpose``: what needs it, e.g. "the digits dataset")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, package = EXTRAS.get(module.split(".")[0], EXTRAS.get(module, ("", "")))
        how = (
            f"pip install 'sgdgeom[{extra}]'"
            if extra
            else f"pip install {package or module.split('.')[0]}"
        )
        raise MissingExtraError(
            f"{purpose} needs {package or module}, which is not installed: {how}"
        ) from None


@functools.cache
def _numba() -> ModuleType | None:
    try:
        return importlib.import_module("numba")
    except ImportError:
        return None


def numba_parallel() -> bool:
    """Whether a numba kernel should be the ``parallel=True`` one: only on more than one
    torch thread. On one, the serial kernel, and numba's thread pool is never launched:
    launching it (its OpenMP layer shares the process's OpenMP runtime with torch) made a
    one-thread sweep run compute on two threads, which slowed its neighbour on a 2-core
    machine six-fold (a PLA epoch from 13 s to 80 s)."""
    return torch.get_num_threads() > 1


def numba_threads() -> ModuleType | None:
    """numba, running on torch's number of threads (``torch.set_num_threads``), or None
    where it is not installed: the CPU kernels it compiles are optional speed-ups
    (``pip install 'sgdgeom[fast]'``), each with a torch route that gives the same result."""
    numba = _numba()
    if numba is not None and numba_parallel():  # one thread: leave numba's pool unlaunched
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return numba
