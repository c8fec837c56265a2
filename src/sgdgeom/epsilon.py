r"""How ε of the diffusion metric :math:`g = I + \varepsilon D` is chosen (Fioresi et al. eq. 6).

The metric is positive definite and its weak-field expansion converges only for
:math:`0 \le \varepsilon < 1/\lambda_{\max}(D)`. :class:`Epsilon` is the one policy every
part of sgdgeom takes (the metric, the optimizer, the RBM update, the geometry and every
experiment), validated once:

- ``Epsilon.auto(fraction)``: :math:`\varepsilon = \text{fraction}/\lambda_{\max}(D)` of
  each D it meets (a new ε at every optimizer step);
- ``Epsilon.fixed(value)``: a number, refused where :math:`\varepsilon\lambda_{\max} \ge 1`;
- ``policy.freeze(lambda_max)``: an ``auto`` policy resolved once, at a reference D, and
  held fixed from then on (ε along a trajectory: a fraction of ``1/λ_max`` at its start).

Wherever an ε is asked for, ``"auto"``, a number or an :class:`Epsilon` is accepted
(:meth:`Epsilon.parse`); the fraction is spelled ``eps_fraction`` in every signature and
config (its old names, ``safety`` and ``eps_fractions`` for one value, are deprecated).

Examples:
    >>> Epsilon.parse("auto").resolve(4.0)
    0.125
    >>> Epsilon.parse(0.1).resolve(4.0)
    0.1
    >>> Epsilon.parse(0.5).resolve(4.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sgdgeom.errors.InputError: eps = 0.5 is at or above 1/λ_max = 0.25; ...
    >>> Epsilon.auto(0.2).freeze(4.0)
    Epsilon(kind='fixed', value=0.05)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

from sgdgeom.errors import InputError

__all__ = ["DEFAULT_FRACTION", "Epsilon", "EpsilonLike"]

DEFAULT_FRACTION = 0.5
"""The fraction of ``1/λ_max`` that ``"auto"`` takes: it keeps the weak-field error below
``(0.5)² / 1.5 = 1/6`` of ``‖v‖`` (:meth:`~sgdgeom.metric.DiffusionMetric.weak_field_bound`)."""


@dataclass(frozen=True)
class Epsilon:
    """A policy for ε (see the module doc): ``kind="auto"`` with ``value`` the fraction of
    ``1/λ_max``, or ``kind="fixed"`` with ``value`` ε itself."""

    kind: Literal["auto", "fixed"]
    value: float

    def __post_init__(self) -> None:
        if self.kind == "auto" and not 0 < self.value < 1:
            raise InputError(f"eps_fraction must be in (0, 1), got {self.value}")
        if self.kind == "fixed" and not (math.isfinite(self.value) and self.value >= 0):
            raise InputError(f"eps must be 'auto' or a finite number >= 0, got {self.value}")
        if self.kind not in ("auto", "fixed"):
            raise InputError(f"an Epsilon is 'auto' or 'fixed', got {self.kind!r}")

    @classmethod
    def auto(cls, fraction: float = DEFAULT_FRACTION) -> Epsilon:
        """``ε = fraction / λ_max`` of every D it meets."""
        return cls("auto", float(fraction))

    @classmethod
    def fixed(cls, value: float) -> Epsilon:
        """A fixed ε (checked against ``1/λ_max`` where it is used)."""
        return cls("fixed", float(value))

    @classmethod
    def parse(cls, eps: EpsilonLike, fraction: float | None = None) -> Epsilon:
        """The policy of ``eps``: ``"auto"`` (with ``fraction``, default
        :data:`DEFAULT_FRACTION`), a number, or an :class:`Epsilon` (returned as it is).
        ``fraction`` is checked whatever ``eps`` is, and used by ``"auto"`` only."""
        auto = cls.auto(DEFAULT_FRACTION if fraction is None else fraction)  # checks it
        if isinstance(eps, Epsilon):
            return eps
        if eps == "auto":
            return auto
        if isinstance(eps, str | bool) or not isinstance(eps, int | float):
            raise InputError(f"eps must be 'auto' or a number, got {eps!r}")
        return cls.fixed(eps)

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto"

    def resolve(self, lambda_max: float) -> float:
        """ε for a D whose largest eigenvalue is ``lambda_max``: ``fraction / λ_max`` (0 when
        D = 0), or the fixed value, refused if ``ε λ_max ≥ 1``."""
        if self.is_auto:
            return self.value / lambda_max if lambda_max > 0 else 0.0
        if self.value * lambda_max >= 1:
            raise InputError(
                f"eps = {self.value:.6g} is at or above 1/λ_max = {1 / lambda_max:.6g}; the "
                f"diffusion metric needs ε < 1/λ_max (Fioresi et al., eq. 6): use eps='auto' "
                f"or a smaller eps"
            )
        return self.value

    def freeze(self, lambda_max: float) -> Epsilon:
        """This policy resolved at a reference ``λ_max`` and held fixed from then on."""
        return Epsilon.fixed(self.resolve(lambda_max))


EpsilonLike = Union[float, Literal["auto"], Epsilon]  # noqa: UP007 (a runtime alias)
"""What every ``eps`` argument takes: ``"auto"``, a number or an :class:`Epsilon`."""
