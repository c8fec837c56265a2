"""Old spellings kept for one release: each warns once per use with the new spelling.

:func:`moved` serves a module whose names moved elsewhere (``sgdgeom.eigen`` is now
:mod:`sgdgeom.linalg`), :func:`renamed` an argument value or keyword whose spelling changed.
The vocabulary they map to is in ``docs/design.md``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SgdgeomDeprecationWarning", "moved", "renamed", "warn"]


class SgdgeomDeprecationWarning(DeprecationWarning):
    """An old spelling of sgdgeom's: the command line shows these (Python hides plain
    deprecation warnings outside ``__main__``)."""


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """One :class:`SgdgeomDeprecationWarning`: ``old`` is deprecated, use ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        SgdgeomDeprecationWarning,
        stacklevel=stacklevel,
    )


def moved(old_module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``{name: "new.module:new_name"}``
    (``new_name`` defaults to ``name``)."""

    def moved_attribute(name: str) -> Any:
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, new_name = target.partition(":")
        new_name = new_name or name
        warn(f"{old_module}.{name}", f"{module}.{new_name}")
        return getattr(importlib.import_module(module), new_name)

    return moved_attribute


def renamed(what: str, value: Any, spellings: Mapping[Any, Any], to: str | None = None) -> Any:
    """``value`` in its new spelling: an old one (a key of ``spellings``) is mapped, with a
    warning that names ``what`` and the new value (of the keyword ``to``, if it was renamed
    too); any other value is returned as is."""
    try:
        if value in spellings and not isinstance(value, float):
            new = spellings[value]
            warn(f"{what}={value!r}", f"{to or what}={new!r}", stacklevel=4)
            return new
    except TypeError:  # an unhashable value: not an old spelling
        pass
    return value
