"""Moved to :mod:`sgdgeom.linalg` (this module is kept for one release)."""

from sgdgeom._deprecated import moved

__getattr__ = moved(
    "sgdgeom.eigen",
    {name: "sgdgeom.linalg" for name in ("METHODS", "Eigenpairs", "top_eigenpairs")},
)
