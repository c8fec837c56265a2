"""Registries: the one place that maps a name to a thing, for each kind of choice.

Every choice a config or a command line makes by name (an optimizer, a training loss, a
monitor, a plot, an experiment kind) is looked up in a :class:`Registry`, never in an
if-chain. Adding one is a module with the thing and one registration; an unknown name is
refused with the list of the known ones, and an old name kept for one release
(:meth:`Registry.alias`) resolves to the new one with a ``DeprecationWarning``. The options
of a registered thing are a pydantic model, an :class:`Options`, so that a config is
validated key by key before anything runs.

Examples:
    >>> colours = Registry("colour")
    >>> _ = colours.register("red", 0xFF0000)
    >>> colours["red"], "blue" in colours
    (16711680, False)
    >>> colours["blue"]
    Traceback (most recent call last):
    ...
    sgdgeom.errors.InputError: unknown colour 'blue'; known: red
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict

from sgdgeom._deprecated import warn
from sgdgeom.errors import InputError

__all__ = ["Options", "Registry", "validate_named"]

T = TypeVar("T")
E = TypeVar("E")
O = TypeVar("O", bound="Options")  # noqa: E741


class Options(BaseModel):
    """The options of a registered thing (a config section): unknown keys are refused and
    values are not coerced (``epochs: true`` is no 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Registry(Generic[T]):
    """Names to things of one kind (``kind`` names it in messages), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (a name registered twice is an error)."""
        if name in self._entries or name in self._aliases:
            raise InputError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[E], E]:
        """``@registry.decorator("name")``: register what it decorates (a class decorator
        keeps the class's own type)."""

        def decorate(entry: E) -> E:
            self.register(name, cast(T, entry))
            return entry

        return decorate

    def alias(self, old: str, new: str) -> None:
        """Keep an old name for one release: it resolves to ``new`` with a warning."""
        self._aliases[old] = new

    def resolve(self, name: object) -> str:
        """The registered name that ``name`` means (an alias mapped, with a warning), or an
        :class:`~sgdgeom.errors.InputError` listing the known names."""
        if isinstance(name, str) and name in self._aliases:
            warn(f"{self.kind} {name!r}", f"{self._aliases[name]!r}", stacklevel=4)
            name = self._aliases[name]
        if not isinstance(name, str) or name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.resolve(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def aliases(self) -> dict[str, str]:
        """The old names kept for one release, each with the name it stands for."""
        return dict(self._aliases)


def validate_named(
    registry: Registry[type[O]],
    data: Any,
    key: str = "name",
    base: type[O] | None = None,
    default: str | None = None,
) -> O:
    """``data`` (a mapping with the registered name under ``key``, or options already
    validated) validated as the options model registered under that name: the
    discriminated union of a registry's models, resolved when the config is read (so a
    model registered by a user's own code is as good as a built-in one). Without a name,
    ``default`` is taken where there is one."""
    if base is not None and isinstance(data, base):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping with a {key!r}, got {type(data).__name__}")
    if key not in data and default is not None:
        data = {key: default, **data}
    if key not in data:
        raise ValueError(f"{key} is missing; known: {', '.join(registry)}")
    try:
        name = registry.resolve(data[key])
    except InputError as err:
        raise ValueError(str(err)) from None
    model = registry[name]
    return model.model_validate({**data, key: name})
