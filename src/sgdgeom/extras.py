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

import importlib
from types import ModuleType

from sgdgeom.errors import MissingExtraError

__all__ = ["EXTRAS", "require"]

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
