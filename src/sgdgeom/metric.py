r"""The diffusion metric :math:`g = I + \varepsilon D` (Fioresi, Chaudhari, Soatto 2020, eq. 6).

With :math:`0 < \varepsilon < 1/\lambda_{\max}(D)` the metric is positive definite and its
inverse has the convergent weak-field expansion :math:`g^{-1} = I - \varepsilon D +
O(\varepsilon^2)`, which the paper uses to turn the geodesic equation into the
metric-gradient flow (F10):

.. math::

    \dot x = -\nabla_D f = -g^{-1} \nabla f \approx -(I - \varepsilon D) \nabla f .

Everything is matrix-free. Writing :math:`D = U U^\top` with
:math:`U = G_c^\top / \sqrt N` (``d x N``) and :math:`K = U^\top U` the centred Gram matrix,
Woodbury's identity gives the exact inverse through an ``N x N`` solve:

.. math::

    g^{-1} v = v - \varepsilon U (I + \varepsilon K)^{-1} U^\top v
             = v - \frac{\varepsilon}{N} G^\top (w - \bar w),\quad
    w = (I + \varepsilon K)^{-1} (c - \bar c),\ c = G v,

and the weak-field form is the same expression with :math:`w = c - \bar c`.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from sgdgeom.diffusion import DiffusionMatrix
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    >>> g = DiffusionMetric(DiffusionMatrix(model, "cross_entropy", (x, y)), eps="auto")
    >>> v = torch.randn(26, dtype=torch.float64)
    >>> bool(torch.allclose(g.apply(g.solve(v)), v))
    True
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from sgdgeom.diffusion import (
    DiffusionMatrix,
    compiled_bounds,
    conjugate_gradients,
    top_eigenvalue_bounds,
)
from sgdgeom.errors import InputError

__all__ = ["DiffusionMetric", "raise_for_status", "resolve_eps"]


def resolve_eps(eps: float | str, safety: float, lambda_max: float) -> float:
    """The ε of the metric: ``"auto"`` is ``safety / λ_max`` (0 when D = 0); a number must
    satisfy ``0 <= ε < 1/λ_max`` (F6)."""
    if not 0 < safety < 1:
        raise InputError(f"safety must be in (0, 1), got {safety}")
    if eps == "auto":
        return safety / lambda_max if lambda_max > 0 else 0.0
    if isinstance(eps, str):
        raise InputError(f"eps must be 'auto' or a number, got {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite number >= 0, got {eps}")
    if eps * lambda_max >= 1:
        raise InputError(
            f"eps = {eps:.6g} is at or above 1/λ_max = {1 / lambda_max:.6g}; the diffusion "
            f"metric needs ε < 1/λ_max (Fioresi et al., eq. 6): use eps='auto' or a smaller eps"
        )
    return eps


def raise_for_status(status: int, eps: float | Tensor, context: str = "") -> None:
    """The error of a :attr:`DiffusionMetric.status` code, if any, after ``context`` (what
    the caller did with the refused step)."""
    if status == DiffusionMetric.NOT_FINITE:
        raise InputError(
            f"{context}the Gram matrix has NaN or infinite entries: the per-sample gradients "
            f"are not finite (a diverged loss?)"
        )
    if status == DiffusionMetric.EPS_TOO_LARGE:
        raise InputError(
            f"{context}eps = {float(eps):.6g} is at or above 1/λ_max (or, without the Gram "
            f"matrix, ε tr D ≥ 1 leaves it unproven); the diffusion metric needs ε < 1/λ_max "
            f"(Fioresi et al., eq. 6): use eps='auto' or a smaller eps"
        )


class DiffusionMetric:
    """The diffusion metric ``g = I + εD`` of a :class:`~sgdgeom.diffusion.DiffusionMatrix`.

    Args:
        D: the diffusion matrix.
        eps: ``"auto"`` (``safety / λ_max``) or a number in ``[0, 1/λ_max)``; anything at
            or above ``1/λ_max`` raises ``ValueError``.
        safety: the fraction of ``1/λ_max`` that ``"auto"`` uses. 0.5 keeps the weak-field
            error below ``(0.5)² / 1.5 = 1/6`` of ``‖v‖``.
        lambda_tol: find ``λ_max`` (for ``"auto"`` and :attr:`lambda_max`) by Lanczos on
            the Gram matrix to this relative residual
            (:func:`~sgdgeom.diffusion.top_eigenvalue`) instead of from the full spectrum.
            A fixed ε is checked exactly either way: ``ε tr D < 1``, or a Cholesky
            factorisation of ``I − εK``, or else the full spectrum.
        matrix_free: never form the ``N x N`` Gram matrix where products do: ``λ_max`` by
            Lanczos on the operator K (``lambda_tol``, default ``1e-10``, see
            :meth:`~sgdgeom.diffusion.DiffusionMatrix.lambda_max`), the exact solve by
            conjugate gradients on ``I + εK``, ``c = G ḡ`` by a JVP. Each product costs a
            VJP and a JVP, so this pays where ``N`` is large against the layers' widths
            (:class:`~sgdgeom.optim.DiffusionMetricSGD` takes it, by cost, for the weak
            step with a fixed ε). A fixed ε with ``ε tr D ≥ 1`` is still checked by the
            Cholesky factorisation, which forms K.
        host_sync: ``False`` keeps every decision on D's device, for a GPU step that never
            waits for the device (:class:`~sgdgeom.optim.DiffusionMetricSGD` on CUDA):
            ``eps="auto"`` becomes ``safety / λ̄``, with ``λ̄`` the upper bound of
            :func:`~sgdgeom.diffusion.top_eigenvalue_bounds` (``λ_max ≤ λ̄ ≤ 1.01 λ_max``,
            so ``ε λ_max`` lies in ``[safety/1.01, safety]``), a 0-d tensor; a fixed ε is
            checked into :attr:`status` instead of raising: by a Cholesky factorisation of
            ``I − εK`` (the Gram route) or by ``ε tr D < 1`` (matrix-free), and the
            gradient comes out all the same. The caller reads :attr:`status` when it may
            wait (:meth:`check` raises what the host route would have raised).
        compile: on the device route, bound ``λ_max`` through ``torch.compile``
            (:func:`~sgdgeom.diffusion.compiled_bounds`: one CUDA graph on a GPU in place of
            about 50 launches; one compilation per batch size).

    Vectors are flat ``(d,)`` tensors in the parameter order of ``D.space``.
    """

    #: the codes of :attr:`status`
    VALID, NOT_FINITE, EPS_TOO_LARGE = 0, 1, 2

    def __init__(
        self,
        D: DiffusionMatrix,
        eps: float | str = "auto",
        safety: float = 0.5,
        lambda_tol: float | None = None,
        matrix_free: bool = False,
        host_sync: bool = True,
        compile: bool = False,
    ) -> None:
        self.D = D
        self.compile = compile
        self.matrix_free = matrix_free
        self.lambda_tol = 1e-10 if matrix_free and lambda_tol is None else lambda_tol
        self.cg_steps = 0  # products of the last conjugate-gradient solve
        self.host_sync = host_sync
        #: on the device route, a 0-d int tensor: VALID, NOT_FINITE or EPS_TOO_LARGE
        self.status: Tensor | None = None
        if not host_sync:
            self.eps = self._device_eps(eps, safety)
        elif isinstance(eps, str):
            self.eps = resolve_eps(eps, safety, self.lambda_max)
        elif float(eps) * D.trace() < 1 or self._valid_by_cholesky(float(eps)):
            self.eps = resolve_eps(eps, safety, 0.0)  # λ_max <= tr D, or I − εK is PD
        else:
            self.eps = resolve_eps(eps, safety, D.lambda_max())  # decides, and explains

    def _device_eps(self, eps: float | str, safety: float) -> float | Tensor:
        """ε and :attr:`status` without a host read (``host_sync=False``)."""
        if eps == "auto":
            resolve_eps(eps, safety, 1.0)  # checks safety
            K = self.D.gram()
            self.lambda_bounds = (compiled_bounds if self.compile else top_eigenvalue_bounds)(K)
            bound = self.lambda_bounds[1].to(K.dtype)
            finite = bound.isfinite()
            self.status = torch.where(finite, self.VALID, self.NOT_FINITE)
            return torch.where(bound > 0, safety / bound, torch.zeros_like(bound))
        eps = resolve_eps(eps, safety, 0.0)  # checks the number; its size is checked below
        if self.matrix_free and "_gram" not in self.D.__dict__:
            trace = self.D.trace_tensor()
            finite, valid = trace.isfinite(), eps * trace < 1
        else:
            K = self.D.gram()
            eye = torch.eye(len(K), dtype=K.dtype, device=K.device)
            finite = K.isfinite().all()  # a NaN off the diagonal too: not "ε too large"
            valid = torch.linalg.cholesky_ex((1 - 1e-9) * eye - eps * K).info == 0
        self.status = torch.where(
            finite, torch.where(valid, self.VALID, self.EPS_TOO_LARGE), self.NOT_FINITE
        )
        return eps

    def check(self) -> None:
        """Raise what the host route would have raised for this metric (a read of
        :attr:`status`, which waits for the device): nothing on the host route."""
        if self.status is not None:
            raise_for_status(int(self.status), self.eps)

    def _valid_by_cholesky(self, eps: float) -> bool:
        """``ε λ_max < 1`` exactly when ``I − εK`` is positive definite: one Cholesky of an
        ``N x N`` matrix instead of its spectrum. A small margin leaves the borderline
        cases to the full spectrum."""
        if not math.isfinite(eps) or eps < 0:
            return False
        K = self.D.gram().double()
        eye = torch.eye(len(K), dtype=K.dtype, device=K.device)
        return int(torch.linalg.cholesky_ex((1 - 1e-9) * eye - eps * K).info) == 0

    def __repr__(self) -> str:
        return f"DiffusionMetric(eps={self.eps:.4g}, {self.D!r})"

    @property
    def lambda_max(self) -> float:
        """D's largest eigenvalue: exact, or by Lanczos when ``lambda_tol`` is set."""
        return self.D.lambda_max(self.lambda_tol, self.matrix_free)

    def apply(self, v: Tensor) -> Tensor:
        """``g v = v + ε D v``."""
        return v + self.eps * self.D.matvec(v)

    def __matmul__(self, v: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """``g @ v`` for a ``(d,)`` vector, a ``(d, k)`` matrix or a dict by parameter name."""
        return self.D.space.apply(self.apply, v)

    @cached_property
    def _cholesky(self) -> Tensor:
        K = self.D.gram()
        eye = torch.eye(len(K), dtype=K.dtype, device=K.device)
        if not self.host_sync:  # I + εK is PD for a PSD K; a NaN K is in status already
            return torch.linalg.cholesky_ex(eye + self.eps * K).L
        return torch.linalg.cholesky(eye + self.eps * K)

    def _weights(self, c: Tensor, exact: bool) -> Tensor:
        """The ``(N,)`` weights ``w`` of ``g⁻¹ v = v − (ε/N) Gᵀ w`` given ``c = G v``:
        ``c − c̄`` (weak field) or ``(I + εK)⁻¹ (c − c̄)``, centred (exact)."""
        w = c - c.mean()
        if exact and self.matrix_free and "_gram" not in self.D.__dict__:
            w = self._conjugate_gradients(w)
        elif exact:
            w = torch.cholesky_solve(w[:, None], self._cholesky)[:, 0]
        return w - w.mean() if exact else w

    def _conjugate_gradients(self, b: Tensor) -> Tensor:
        """``(I + εK)⁻¹ b`` by conjugate gradients in float64, K applied by products in D's
        dtype, to a relative residual of ``max(1e-12, 64 ε_dtype)``."""

        def matvec(w: Tensor) -> Tensor:
            return w + self.eps * self.D.gram_matvec(w.to(b.dtype)).double()

        tol = max(1e-12, 64 * torch.finfo(b.dtype).eps)
        w, self.cg_steps = conjugate_gradients(matvec, b.double(), tol)
        return w.to(b.dtype)

    def _solve(self, v: Tensor, c: Tensor, exact: bool) -> Tensor:
        """``g⁻¹ v`` (exact) or ``(I − εD) v`` given ``c = G v``."""
        if self.host_sync and self.eps == 0:
            return v.clone()
        return v - (self.eps / self.D.n) * self.D.products.vjp(self._weights(c, exact))

    def solve(self, v: Tensor, exact: bool = True) -> Tensor:
        """``g⁻¹ v`` exactly (Woodbury through the ``N x N`` Gram matrix) or, with
        ``exact=False``, the weak-field ``(I − εD) v``."""
        self.D.space.check_vector(v)
        return self._solve(v, self.D.products.jvp(v), exact)

    def gradient(self, exact: bool = True, out: Tensor | None = None) -> Tensor:
        """The metric gradient ``∇_D f = g⁻¹ ∇f`` (F10), or its weak-field form
        ``(I − εD) ∇f``, of the mean loss of D's data.

        With ``∇f = ḡ = (1/N) Gᵀ 1`` it is one weighted sum of the per-sample gradients,
        ``Gᵀ (1 − ε w) / N``: a single VJP, which never needs ``ḡ`` itself once the Gram
        matrix gives ``c = G ḡ`` (its row means). ``out``: a ``(d,)`` buffer to write it to.
        """
        skip = self.host_sync and not self.eps  # a device ε is never read on the host
        w = 0.0 if skip else self._weights(self.D.gradient_products(), exact)
        coefficients = torch.ones(self.D.n, dtype=self.D.space.dtype, device=self.D.space.device)
        return self.D.products.vjp((coefficients - self.eps * w) / self.D.n, out=out)

    def weak_field_error(self, v: Tensor) -> float:
        """``‖g⁻¹ v − (I − εD) v‖``, never more than ``weak_field_bound() · ‖v‖``."""
        c = self.D.products.jvp(v)
        return float((self._solve(v, c, True) - self._solve(v, c, False)).norm())

    def weak_field_bound(self) -> float:
        """``‖(I + εD)⁻¹ − (I − εD)‖₂ ≤ (ελ_max)² / (1 + ελ_max)``.

        Both operators share D's eigenvectors; on an eigenvalue λ the difference is
        ``1/(1+ελ) − 1 + ελ = (ελ)²/(1+ελ)``, which grows with λ, so its largest value, at
        ``λ_max``, is the operator norm (an equality, not only a bound).
        """
        x = self.eps * self.lambda_max
        return x * x / (1 + x)
