"""Errors that sgdgeom raises for bad input.

Every error names the problem and the fix. The CLI prints them as one line, without a
traceback, and exits with status 2; library users catch :class:`InputError` (bad input of
any kind, also a ``ValueError``), :class:`SgdgeomError` (anything sgdgeom refuses) or a
specific subclass.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DatasetMissingError",
    "InputError",
    "MissingExtraError",
    "NonFiniteLossError",
    "SgdgeomError",
    "UnsupportedModelError",
]


class SgdgeomError(Exception):
    """Base class of the errors sgdgeom raises for bad input or a failed run."""


class InputError(SgdgeomError, ValueError):
    """Bad input: an argument, a config, a file or a model that sgdgeom cannot use as given."""


class ConfigError(InputError):
    """An experiment config has an unknown key, a missing key or a bad value."""


class DatasetError(InputError, OSError):
    """A dataset is unknown, or its files are missing, truncated or corrupt."""


class DatasetMissingError(DatasetError):
    """A dataset's data root or one of its files is not there."""


class CheckpointError(InputError):
    """A checkpoint is missing, truncated, corrupt, unsafe to load or from another run."""


class UnsupportedModelError(InputError):
    """A model has a layer that the requested computation does not support."""


class MissingExtraError(SgdgeomError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class NonFiniteLossError(SgdgeomError, FloatingPointError):
    """The training loss, a metric or a weight became NaN or infinite."""
