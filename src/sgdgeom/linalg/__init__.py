"""Linear algebra over parameter space: the operator base and the numerics beneath it.

- :mod:`~sgdgeom.linalg.operator`: :class:`Operator`, the base of every ``d x d``
  operator (the diffusion matrix, its layer blocks, the Hessian): products, ``dense``,
  ``eigsh``, Hutchinson's trace, a SciPy ``LinearOperator``;
- :mod:`~sgdgeom.linalg.krylov`: top-k eigenpairs by block Lanczos, subspace iteration or
  ARPACK, and Lanczos for the top eigenvalue;
- :mod:`~sgdgeom.linalg.bounds`: ``λ_max`` of a small PSD matrix, exact or bracketed on its
  device;
- :mod:`~sgdgeom.linalg.solvers`: conjugate gradients.
"""

from sgdgeom.linalg.bounds import (
    bound_squarings,
    compiled_bounds,
    top_eigenvalue,
    top_eigenvalue_bounds,
)
from sgdgeom.linalg.krylov import (
    METHODS,
    Eigenpairs,
    Method,
    MethodChoice,
    lanczos_top,
    top_eigenpairs,
)
from sgdgeom.linalg.operator import DENSE_LIMIT, Operator
from sgdgeom.linalg.solvers import conjugate_gradients

__all__ = [
    # the operator base
    "DENSE_LIMIT",
    "Operator",
    # eigenpairs and eigenvalues
    "METHODS",
    "Eigenpairs",
    "Method",
    "MethodChoice",
    "lanczos_top",
    "top_eigenpairs",
    "bound_squarings",
    "compiled_bounds",
    "top_eigenvalue",
    "top_eigenvalue_bounds",
    # solves
    "conjugate_gradients",
]
