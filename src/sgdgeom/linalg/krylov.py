r"""Krylov methods: the top-k eigenpairs of a symmetric PSD operator given only its block
product ``A V``, and the top eigenvalue of a small matrix by Lanczos.

The diffusion matrix and the Hessian are ``d x d`` operators whose every product is a pass
over the data set. A block method multiplies ``m`` vectors at once, so one pass over the
data serves ``m`` products, each a matrix-matrix product on the captured layers rather than
``m`` matrix-vector ones. Three methods, each returning :class:`Eigenpairs` with the true
residual ``‖A u − λ u‖`` of every pair and the cost in passes and vector products:

- ``"randomized"``: subspace iteration with Rayleigh–Ritz (Halko, Martinsson, Tropp 2011,
  Alg. 4.4 and 5.3; Saad, *Numerical Methods for Large Eigenvalue Problems*, §5.2) on
  ``k + p`` vectors: every pass applies ``A`` to the basis, takes the Ritz pairs of
  ``Qᵀ A Q`` (their residuals come for free: ``A U = (A Q) S``) and orthonormalises
  ``A Q`` as the next basis. It stops when the ``k`` wanted residuals are below
  ``tol · λ_1``. Its convergence factor per pass is ``λ_{k+p+1} / λ_k``.
- ``"block-lanczos"``: block Krylov space ``span{Q, AQ, A²Q, …}`` with blocks of
  ``k + p`` vectors and full reorthogonalisation (Golub & Underwood 1977; Saad §6.6),
  Rayleigh–Ritz on the whole space. It converges much faster than subspace iteration
  (Chebyshev-like in the gap), at the price of keeping the basis (``d x`` the passes
  ``x (k + p)``). When the Lanczos estimate of the residuals says it has converged, one
  block product of the ``k`` Ritz vectors checks the true residuals; if rounding left them
  above tolerance, it goes on, until a check no longer halves them (the rounding floor of
  the products: then ``converged=False``).
- ``"lanczos"``: single-vector implicitly restarted Lanczos (scipy's ARPACK ``eigsh``),
  one pass per product: the reference the block methods are measured against.

Every product is counted: ``passes`` is the number of block products (each one pass over
the data), ``products`` the number of vectors multiplied.

Examples:
    >>> import torch
    >>> A = torch.diag(torch.arange(50, 0, -1, dtype=torch.float64))
    >>> pairs = top_eigenpairs(lambda V: A @ V, 50, 3, torch.float64, method="block-lanczos")
    >>> [round(v, 9) for v in pairs.values.tolist()], pairs.passes
    ([50.0, 49.0, 48.0], 5)
    >>> bool(pairs.residuals.max() < 1e-8 * 50)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sgdgeom.errors import InputError
from sgdgeom.memory import available_bytes

__all__ = [
    "METHODS",
    "Eigenpairs",
    "Method",
    "MethodChoice",
    "arpack_bytes",
    "krylov_bytes",
    "lanczos_top",
    "top_eigenpairs",
]

Method = Literal["randomized", "block-lanczos", "lanczos"]
METHODS: tuple[str, ...] = get_args(Method)
#: what an operator's ``eigsh`` takes: a method, or ``"auto"`` (the operator chooses)
MethodChoice = Literal["auto", "randomized", "block-lanczos", "lanczos"]

Matmat = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Eigenpairs:
    """The top-k eigenpairs of a symmetric operator and what they cost.

    Unpacks as ``values, vectors = pairs`` (the ``eigsh`` convention).

    Attributes:
        values: ``(k,)``, descending.
        vectors: ``(d, k)``, orthonormal columns.
        residuals: ``(k,)``, ``‖A u_j − λ_j u_j‖`` from a product with the returned vectors.
        passes: block products, each one pass over the data.
        products: vectors multiplied by ``A`` in all.
        converged: whether every residual is at most ``tol · λ_1``.
        method: the method's name.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    passes: int
    products: int
    converged: bool
    method: str

    def __iter__(self) -> Iterator[Tensor]:
        yield self.values
        yield self.vectors


class _Counted:
    """A block product that counts its passes and the vectors it multiplies."""

    def __init__(self, matmat: Matmat, progress: tqdm | None) -> None:
        self.matmat, self.progress = matmat, progress
        self.passes = self.products = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.passes += 1
        self.products += V.shape[1]
        if self.progress is not None:
            self.progress.update(1)
        return self.matmat(V)


def top_eigenpairs(
    matmat: Matmat,
    dim: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    method: Method = "block-lanczos",
    oversample: int = 10,
    block: int | None = None,
    tol: float | None = None,
    max_passes: int = 60,
    seed: int = 0,
    progress: bool = False,
    label: str = "",
) -> Eigenpairs:
    """The ``k`` largest eigenpairs of the symmetric ``(dim, dim)`` operator ``V ↦ matmat(V)``
    (``(dim, m) -> (dim, m)``), by ``method`` (see the module docstring).

    Args:
        oversample: ``p``, extra vectors in each block (``k + p`` in all) of the block
            methods.
        block: vectors per pass instead of ``k + p``. Block Lanczos takes any block
            (smaller ones: fewer products, more passes); subspace iteration needs ``>= k``.
        tol: stop when every wanted residual is at most ``tol · λ_1`` (default: the square
            root of the dtype's machine epsilon, 1.5e-8 in float64; an eigenvalue's error is
            then of order ``residual² / gap``).
        max_passes: the block methods give up after this many block products, with a
            warning and ``converged=False`` (ARPACK keeps its own limit).
        seed: the random start block.
        label: what the progress bar names (the operator's symbol).

    Block Lanczos keeps its whole basis: its memory grows by a block of ``dim``-vectors
    (and their products) each pass. The passes are bounded up front by half the memory the
    device has free (:func:`krylov_bytes`): fewer than ``max_passes`` with a warning, or
    an :class:`~sgdgeom.errors.InputError` with the sizes where not even three fit.
    Single-vector Lanczos (ARPACK, float64 vectors in host memory) is refused the same way
    where its basis (:func:`arpack_bytes`) would take more than half the free memory.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 1 <= k < dim:
        raise InputError(f"k must be in 1..{dim - 1}, got {k}")
    if oversample < 0 or max_passes < 1:
        raise InputError(
            f"oversample must be >= 0 and max_passes >= 1, got {oversample}, {max_passes}"
        )
    tol = math.sqrt(torch.finfo(dtype).eps) if tol is None else tol
    block = min(k + oversample if block is None else block, dim)
    if block < 1 or (method == "randomized" and block < k):
        raise InputError(f"block must be >= 1 (>= k = {k} for randomized), got {block}")
    if method == "block-lanczos":
        max_passes = _passes_that_fit(dim, block, dtype, torch.device(device), max_passes)
    if method == "lanczos":
        _arpack_fits(dim, k)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, block, generator=generator, dtype=torch.float64).to(device, dtype)
    bar = tqdm(
        total=None if method == "lanczos" else max_passes,
        desc=f"{label} {method} top-{k}".strip(),
        disable=not progress,
        leave=False,
    )
    counted = _Counted(matmat, bar)
    try:
        if method == "randomized":
            values, vectors, residuals = _subspace_iteration(counted, start, k, tol, max_passes)
        elif method == "block-lanczos":
            values, vectors, residuals = _block_lanczos(counted, start, k, tol, max_passes)
        else:
            values, vectors, residuals = _arpack(counted, start[:, 0], k, tol, max_passes)
    finally:
        bar.close()
    converged = bool((residuals <= tol * max(float(values[0]), 0.0) + 1e-300).all())
    if not converged:
        warnings.warn(
            f"{method}: the top-{k} residuals reached {float(residuals.max()):.2e} "
            f"(asked {tol:.1e} · λ_1) after {counted.passes} passes; raise max_passes or "
            f"oversample, or, where the residuals stall at the rounding level of the "
            f"products, loosen tol or compute in float64",
            stacklevel=2,
        )
    return Eigenpairs(
        values, vectors, residuals, counted.passes, counted.products, converged, method
    )


def _orthonormal(V: Tensor, against: Tensor | None = None, scale: float | None = None) -> Tensor:
    """An orthonormal basis of the part of ``V``'s range orthogonal to the columns of
    ``against`` (projected out twice: "twice is enough", Kahan–Parlett), without the
    directions below rounding relative to ``scale`` (default ``‖V‖``): an exhausted
    invariant subspace, or a rank-deficient operator."""
    scale = float(V.norm()) if scale is None else scale
    if against is not None:
        for _ in range(2):
            V = V - against @ (against.T @ V)
    Q, R = torch.linalg.qr(V)
    keep = R.diagonal().abs() > 1e3 * torch.finfo(V.dtype).eps * max(scale, 1e-300)
    basis: Tensor = Q[:, keep]
    return basis


def _top_ritz(B: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k eigenpairs of the small projected matrix ``B = Qᵀ A Q`` (in float64)."""
    theta, S = torch.linalg.eigh(((B + B.T) / 2).double())
    return theta.flip(0)[:k].to(B.dtype), S.flip(1)[:, :k].to(B.dtype)


def _done(theta: Tensor, residuals: Tensor, tol: float) -> bool:
    return bool((residuals <= tol * float(theta[0])).all())


def _subspace_iteration(
    A: _Counted, start: Tensor, k: int, tol: float, max_passes: int
) -> tuple[Tensor, Tensor, Tensor]:
    Q = _orthonormal(start)
    while True:
        AQ = A(Q)
        theta, S = _top_ritz(Q.T @ AQ, k)
        U = Q @ S
        residuals = (AQ @ S - U * theta).norm(dim=0)  # A U = (A Q) S: no extra product
        if _done(theta, residuals, tol) or A.passes >= max_passes:
            return theta, U, residuals
        Q = _orthonormal(AQ)
        if Q.shape[1] < start.shape[1]:  # A's range is exhausted: the rest is its null space
            Q = torch.cat([Q, _orthonormal(start[:, Q.shape[1] :], Q)], 1)


def krylov_bytes(dim: int, block: int, passes: int, dtype: torch.dtype) -> int:
    """The peak memory of ``passes`` passes of block Lanczos: the basis Q and its products
    AQ, ``passes · block`` vectors of ``dim`` each, twice over while a pass appends to
    them (the concatenation copies)."""
    return 4 * passes * block * dim * torch.empty((), dtype=dtype).element_size()


def arpack_bytes(dim: int, k: int) -> int:
    """The memory of scipy's ARPACK for the top k of a ``dim``-dimensional operator: its
    Lanczos basis of ``ncv = max(2k + 1, 20)`` float64 vectors, its work vectors and the k
    eigenvectors it returns."""
    ncv = min(dim, max(2 * k + 1, 20))
    return (ncv + k + 4) * dim * 8


def _arpack_fits(dim: int, k: int) -> None:
    """Refuse single-vector Lanczos where its basis would not fit in half the free memory
    of the host (ARPACK works in host memory, whatever the operator's device)."""
    free = available_bytes(torch.device("cpu"))
    if free is not None and arpack_bytes(dim, k) > free // 2:
        raise InputError(
            f"single-vector Lanczos (ARPACK) for the top {k} of {dim:,} dimensions keeps "
            f"{arpack_bytes(dim, k) / 2**30:.1f} GiB of float64 vectors, and half the "
            f"{free / 2**30:.1f} GiB free is its budget: ask fewer eigenpairs (k), or use "
            f"method='randomized' (two blocks of memory, in the operator's dtype)"
        )


def _passes_that_fit(
    dim: int, block: int, dtype: torch.dtype, device: torch.device, max_passes: int
) -> int:
    """``max_passes``, or fewer where the basis would not fit in free memory (warned)."""
    free = available_bytes(device)
    if free is None or krylov_bytes(dim, block, max_passes, dtype) <= free // 2:
        return max_passes
    budget = free // 2  # the rest: the products, the process
    fits = budget // krylov_bytes(dim, block, 1, dtype)
    if fits < 3:
        raise InputError(
            f"block Lanczos with a block of {block} vectors of {dim:,} entries needs "
            f"{krylov_bytes(dim, block, 3, dtype) / 2**30:.1f} GiB for its first three passes, "
            f"and half the {free / 2**30:.1f} GiB free is its budget: ask fewer eigenpairs (k), "
            f"or use method='randomized' (two blocks of memory)"
        )
    warnings.warn(
        f"block Lanczos: {max_passes} passes of {block} vectors of {dim:,} entries would take "
        f"{krylov_bytes(dim, block, max_passes, dtype) / 2**30:.1f} GiB, and its budget is "
        f"half the {free / 2**30:.1f} GiB free: stopping after {fits} passes",
        stacklevel=3,
    )
    return int(fits)


def _block_lanczos(
    A: _Counted, start: Tensor, k: int, tol: float, max_passes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Block Lanczos with full reorthogonalisation. ``B = Qᵀ A Q`` grows by one block row
    and column per pass (block tridiagonal up to rounding; kept whole, as cheap)."""
    Q = _orthonormal(start)
    AQ = A(Q)
    B, width, scale = Q.T @ AQ, Q.shape[1], float(AQ.norm())
    checked = float("inf")  # the largest true residual at the last check
    while True:
        theta, S = _top_ritz(B, k)
        # a Ritz pair's residual lies in the next block: (I − QQᵀ) A Q s
        step = AQ[:, -width:] - Q @ B[:, -width:]
        estimate = (step @ S[-width:]).norm(dim=0)
        following = _orthonormal(step, Q, scale)
        exhausted = following.shape[1] == 0  # an invariant subspace: the Ritz pairs are exact
        if exhausted and len(theta) < k:
            raise InputError(
                f"the Krylov space of a block of {start.shape[1]} was exhausted at dimension "
                f"{len(theta)} < k = {k}: take a block of at least k vectors"
            )
        out_of_passes = A.passes >= max_passes - 1
        if len(theta) >= k and (exhausted or out_of_passes or _done(theta, estimate, tol)):
            U = Q @ S
            residuals = (A(U) - U * theta).norm(dim=0)  # the true ones: rounding can differ
            stalled = float(residuals.max()) > 0.5 * checked  # at the rounding floor
            if exhausted or out_of_passes or stalled or _done(theta, residuals, tol):
                return theta, U, residuals
            checked = float(residuals.max())
        A_following = A(following)
        across = Q.T @ A_following
        B = torch.cat(
            [torch.cat([B, across], 1), torch.cat([across.T, following.T @ A_following], 1)], 0
        )
        Q, AQ = torch.cat([Q, following], 1), torch.cat([AQ, A_following], 1)
        width = following.shape[1]


def _arpack(
    A: _Counted, start: Tensor, k: int, tol: float, max_passes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """scipy's ARPACK on single products (its own tolerance ``tol`` is relative to each
    Ritz value), then one block product for the true residuals."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    dim, dtype, device = len(start), start.dtype, start.device

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(v).reshape(-1, 1), dtype=dtype, device=device)
        return A(t)[:, 0].double().cpu().numpy()

    operator = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    values, vectors = eigsh(operator, k=k, which="LA", tol=tol, v0=start.double().cpu().numpy())
    order = np.argsort(values)[::-1]
    theta = torch.as_tensor(values[order].copy(), dtype=dtype, device=device)
    U = torch.as_tensor(vectors[:, order].copy(), dtype=dtype, device=device)
    residuals = (A(U) - U * theta).norm(dim=0)
    return theta, U, residuals


def lanczos_top(
    matvec: Callable[[np.ndarray], np.ndarray], n: int, tol: float
) -> tuple[float, int]:
    """The largest eigenvalue of a symmetric PSD operator on ``R^n`` (float64 vectors) and
    the number of products it took: Lanczos with full reorthogonalisation from a fixed start
    vector.

    It stops when the top Ritz pair's residual ``‖K u − θ u‖ = β_m |s_m|`` is at most
    ``tol · θ``: some eigenvalue lies within that residual of θ, and ``λ_max − θ ≤
    residual² / gap`` (Parlett, *The Symmetric Eigenvalue Problem*, §11.7). After ``n``
    steps the Krylov space is the whole space and θ is exact.
    """
    q = np.random.default_rng(0).standard_normal(n)
    q /= np.linalg.norm(q)
    basis = np.empty((n, n))
    alphas: list[float] = []
    betas: list[float] = []
    for m in range(n):
        basis[m] = q
        z = matvec(q)
        if not np.isfinite(z).all():
            raise InputError(
                "the diffusion matrix has NaN or infinite products: the per-sample gradients "
                "are not finite (a diverged loss?)"
            )
        alphas.append(float(q @ z))
        for _ in range(2):  # full reorthogonalisation; "twice is enough" (Kahan, Parlett)
            z -= basis[: m + 1].T @ (basis[: m + 1] @ z)
        beta = float(np.linalg.norm(z))
        exhausted = m == n - 1 or beta <= 1e-14 * max(map(abs, alphas))  # θ is exact
        if exhausted or m % 4 == 3:
            T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            values, vectors = np.linalg.eigh(T)
            theta = float(values[-1])
            if exhausted or beta * abs(vectors[-1, -1]) <= tol * theta:
                return theta, m + 1
        betas.append(beta)
        q = z / beta
    raise AssertionError("unreachable: the loop returns by step n")
