"""Errors that sgdgeom raises for bad input.

Every error names the problem and the fix. The CLI prints them as one line, without a
traceback; library users catch :class:`SgdgeomError` or the specific subclass.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetError",
    "NonFiniteLossError",
    "SgdgeomError",
    "UnsupportedModelError",
]


class SgdgeomError(Exception):
    """Base class of the errors sgdgeom raises for bad input or a failed run."""


class ConfigError(SgdgeomError, ValueError):
    """An experiment config has an unknown key, a missing key or a bad value."""


class DatasetError(SgdgeomError, OSError):
    """A dataset is unknown, or its files are missing, truncated or corrupt."""


class NonFiniteLossError(SgdgeomError, FloatingPointError):
    """The training loss became NaN or infinite."""


class UnsupportedModelError(SgdgeomError, ValueError):
    """A model has a layer that the requested computation does not support."""
