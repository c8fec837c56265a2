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

and the weak-field form is the same expression with :math:`w = c - \bar c`. Which of the
two a method applies is its ``inverse``, ``"exact"`` or ``"weak"``, everywhere in sgdgeom;
ε is an :class:`~sgdgeom.epsilon.Epsilon` policy.

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
from typing import Literal, get_args

import torch
from torch import Tensor

from sgdgeom._deprecated import warn
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon, EpsilonLike
from sgdgeom.errors import InputError
from sgdgeom.linalg import compiled_bounds, conjugate_gradients, top_eigenvalue_bounds
from sgdgeom.precision import in_full_precision

__all__ = ["INVERSES", "DiffusionMetric", "Inverse", "Sync", "inverse_of", "raise_for_status"]

Inverse = Literal["weak", "exact"]
"""Which inverse of the metric: ``"exact"``, ``(I + εD)⁻¹``, or ``"weak"``, the weak-field
``I − εD`` of (F10)."""
INVERSES: tuple[Inverse, ...] = get_args(Inverse)

Sync = Literal["host", "device"]
"""Where a step's decisions are read: on the host (exact ``λ_max`` by Lanczos; errors at
once) or on the device, with no host read (``λ_max`` bounded; errors one step late)."""


def inverse_of(inverse: str, exact: bool | None = None) -> Inverse:
    """``inverse`` checked, or the old ``exact=True/False`` spelling mapped to it (with a
    deprecation warning)."""
    if exact is not None:
        warn(f"exact={exact}", f"inverse={'exact' if exact else 'weak'!r}")
        return "exact" if exact else "weak"
    if inverse not in INVERSES:
        raise InputError(f"inverse must be 'weak' or 'exact', got {inverse!r}")
    checked: Inverse = "exact" if inverse == "exact" else "weak"
    return checked


def resolve_eps(eps: EpsilonLike, safety: float, lambda_max: float) -> float:
    """Deprecated: ``Epsilon.parse(eps, fraction).resolve(lambda_max)``."""
    warn("sgdgeom.metric.resolve_eps", "sgdgeom.epsilon.Epsilon.parse(eps, fraction).resolve")
    return Epsilon.parse(eps, safety).resolve(lambda_max)


SAMPLES_LEFT_OUT = (
    "some samples of the step's forward have an exactly zero gradient, as a loss that leaves "
    "samples out gives them (ignore_index, a loss on part of the output): the hooked loop "
    "takes every sample of the forward for a sample of the loss, so D would count them with "
    "a zero gradient. Pass only the samples that the loss uses through the model, or step "
    "through a closure that returns their per-sample losses; if these samples are in the "
    "loss with a zero gradient (a hinge loss), pass zero_gradient_samples='keep'"
)


def raise_for_status(status: int, eps: float | Tensor, context: str = "") -> None:
    """The error of a :attr:`DiffusionMetric.status` code, if any, after ``context`` (what
    the caller did with the refused step)."""
    if status == DiffusionMetric.NOT_FINITE:
        raise InputError(
            f"{context}the Gram matrix has NaN or infinite entries: the per-sample gradients "
            f"are not finite (a diverged loss?)"
        )
    if status == DiffusionMetric.SAMPLES_LEFT_OUT:
        raise InputError(f"{context}{SAMPLES_LEFT_OUT}")
    if status == DiffusionMetric.EPS_TOO_LARGE:
        raise InputError(
            f"{context}eps = {float(eps):.6g} is at or above 1/λ_max (or, without the Gram "
            f"matrix, ε tr D ≥ 1 leaves it unproven); the diffusion metric needs ε < 1/λ_max "
            f"(Fioresi et al., eq. 6): use eps='auto' or a smaller eps"
        )


@in_full_precision
class DiffusionMetric:
    """The diffusion metric ``g = I + εD`` of a :class:`~sgdgeom.diffusion.DiffusionMatrix`.

    Args:
        D: the diffusion matrix (the covariance: ``centered=True``).
        eps: ``"auto"`` (``eps_fraction / λ_max``), a number in ``[0, 1/λ_max)`` (anything
            at or above ``1/λ_max`` raises ``ValueError``) or an
            :class:`~sgdgeom.epsilon.Epsilon`.
        eps_fraction: the fraction of ``1/λ_max`` that ``"auto"`` takes (default 0.5,
            :data:`~sgdgeom.epsilon.DEFAULT_FRACTION`).
        lambda_tol: find ``λ_max`` (for ``"auto"`` and :attr:`lambda_max`) by Lanczos on
            the Gram matrix to this relative residual
            (:func:`~sgdgeom.linalg.top_eigenvalue`) instead of from the full spectrum.
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
        sync: ``"device"`` keeps every decision on D's device, for a GPU step that never
            waits for the device (:class:`~sgdgeom.optim.DiffusionMetricSGD` on CUDA):
            ``eps="auto"`` becomes ``eps_fraction / λ̄``, with ``λ̄`` the upper bound of
            :func:`~sgdgeom.linalg.top_eigenvalue_bounds` (``λ_max ≤ λ̄ ≤ 1.01 λ_max``,
            so ``ε λ_max`` lies in ``[fraction/1.01, fraction]``), a 0-d tensor; a fixed ε
            is checked into :attr:`status` instead of raising: by a Cholesky factorisation
            of ``I − εK`` (with the Gram matrix) or by ``ε tr D < 1`` (matrix-free), and the
            gradient comes out all the same. The caller reads :attr:`status` when it may
            wait (:meth:`check` raises what a host-synchronised metric would have raised).
        compile: with ``sync="device"``, bound ``λ_max`` through ``torch.compile``
            (:func:`~sgdgeom.linalg.compiled_bounds`: one CUDA graph on a GPU in place of
            about 50 launches; one compilation per batch size).

    Vectors are flat ``(d,)`` tensors in the parameter order of ``D.space``.
    """

    #: the codes of :attr:`status`
    VALID, NOT_FINITE, EPS_TOO_LARGE, SAMPLES_LEFT_OUT = 0, 1, 2, 3

    def __init__(
        self,
        D: DiffusionMatrix,
        eps: EpsilonLike = "auto",
        eps_fraction: float | None = None,
        lambda_tol: float | None = None,
        matrix_free: bool = False,
        sync: Sync = "host",
        compile: bool = False,
        *,
        safety: float | None = None,
        host_sync: bool | None = None,
    ) -> None:
        if safety is not None:
            warn("DiffusionMetric(safety=...)", "eps_fraction=...")
            eps_fraction = safety
        if host_sync is not None:
            warn(f"host_sync={host_sync}", f"sync={'host' if host_sync else 'device'!r}")
            sync = "host" if host_sync else "device"
        if sync not in get_args(Sync):
            raise InputError(f"sync must be 'host' or 'device', got {sync!r}")
        if not D.centered:
            raise InputError(
                "the diffusion metric is built on the covariance D: pass a DiffusionMatrix "
                "with centered=True"
            )
        self.policy = Epsilon.parse(eps, eps_fraction)
        self.D = D
        self.compile = compile
        self.matrix_free = matrix_free
        self.lambda_tol = 1e-10 if matrix_free and lambda_tol is None else lambda_tol
        self.cg_steps = 0  # products of the last conjugate-gradient solve
        self.sync: Sync = sync
        #: with sync="device", a 0-d int tensor: VALID, NOT_FINITE or EPS_TOO_LARGE
        self.status: Tensor | None = None
        policy = self.policy
        self.eps: float | Tensor
        if sync == "device":
            self.eps = self._device_eps(policy)
        elif policy.is_auto:
            self.eps = policy.resolve(self.lambda_max)
        elif policy.value * D.trace() < 1 or self._valid_by_cholesky(policy.value):
            self.eps = policy.value  # λ_max <= tr D, or I − εK is PD
        else:
            self.eps = policy.resolve(D.lambda_max())  # decides, and explains

    @property
    def host_sync(self) -> bool:
        """Deprecated: ``sync == "host"``."""
        return self.sync == "host"

    def _device_eps(self, policy: Epsilon) -> float | Tensor:
        """ε and :attr:`status` without a host read (``sync="device"``)."""
        if policy.is_auto:
            K = self.D.gram()
            self.lambda_bounds = (compiled_bounds if self.compile else top_eigenvalue_bounds)(K)
            bound = self.lambda_bounds[1].to(K.dtype)
            finite = bound.isfinite()
            self.status = torch.where(finite, self.VALID, self.NOT_FINITE)
            return torch.where(bound > 0, policy.value / bound, torch.zeros_like(bound))
        eps = policy.value  # its size is checked below
        if self.matrix_free and not self.D.has_gram:
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
        """Raise what a host-synchronised metric would have raised (a read of
        :attr:`status`, which waits for the device): nothing with ``sync="host"``."""
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
        return f"DiffusionMetric(eps={float(self.eps):.4g}, {self.D!r})"

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
        factor: Tensor
        if self.sync == "device":  # I + εK is PD for a PSD K; a NaN K is in status already
            factor = torch.linalg.cholesky_ex(eye + self.eps * K).L
        else:
            factor = torch.linalg.cholesky(eye + self.eps * K)
        return factor

    def _weights(self, c: Tensor, inverse: Inverse) -> Tensor:
        """The ``(N,)`` weights ``w`` of ``g⁻¹ v = v − (ε/N) Gᵀ w`` given ``c = G v``:
        ``c − c̄`` (weak field) or ``(I + εK)⁻¹ (c − c̄)``, centred (exact)."""
        w = c - c.mean()
        if inverse == "weak":
            return w
        if self.matrix_free and not self.D.has_gram:
            w = self._conjugate_gradients(w)
        else:
            w = torch.cholesky_solve(w[:, None], self._cholesky)[:, 0]
        return w - w.mean()

    def _conjugate_gradients(self, b: Tensor) -> Tensor:
        """``(I + εK)⁻¹ b`` by conjugate gradients in float64, K applied by products in D's
        dtype, to a relative residual of ``max(1e-12, 64 ε_dtype)``."""

        def matvec(w: Tensor) -> Tensor:
            return w + self.eps * self.D.gram_matvec(w.to(b.dtype)).double()

        tol = max(1e-12, 64 * torch.finfo(b.dtype).eps)
        w, self.cg_steps = conjugate_gradients(matvec, b.double(), tol)
        return w.to(b.dtype)

    def _solve(self, v: Tensor, c: Tensor, inverse: Inverse) -> Tensor:
        """``g⁻¹ v`` (exact) or ``(I − εD) v`` given ``c = G v``."""
        if self.sync == "host" and self.eps == 0:
            return v.clone()
        return v - (self.eps / self.D.n) * self.D.products.vjp(self._weights(c, inverse))

    def solve(self, v: Tensor, inverse: Inverse = "exact", *, exact: bool | None = None) -> Tensor:
        """``g⁻¹ v`` exactly (Woodbury through the ``N x N`` Gram matrix) or, with
        ``inverse="weak"``, the weak-field ``(I − εD) v``."""
        inverse = inverse_of(inverse, exact)
        self.D.space.check_vector(v)
        return self._solve(v, self.D.products.jvp(v), inverse)

    def gradient(
        self, inverse: Inverse = "exact", out: Tensor | None = None, *, exact: bool | None = None
    ) -> Tensor:
        """The metric gradient ``∇_D f = g⁻¹ ∇f`` (F10), or its weak-field form
        ``(I − εD) ∇f`` (``inverse="weak"``), of the mean loss of D's data.

        With ``∇f = ḡ = (1/N) Gᵀ 1`` it is one weighted sum of the per-sample gradients,
        ``Gᵀ (1 − ε w) / N``: a single VJP, which never needs ``ḡ`` itself once the Gram
        matrix gives ``c = G ḡ`` (its row means). ``out``: a ``(d,)`` buffer to write it to.
        """
        inverse = inverse_of(inverse, exact)
        skip = self.sync == "host" and not self.eps  # a device ε is never read on the host
        w = 0.0 if skip else self._weights(self.D.gradient_products(), inverse)
        coefficients = torch.ones(self.D.n, dtype=self.D.space.dtype, device=self.D.space.device)
        return self.D.products.vjp((coefficients - self.eps * w) / self.D.n, out=out)

    def weak_field_error(self, v: Tensor) -> float:
        """``‖g⁻¹ v − (I − εD) v‖``, never more than ``weak_field_bound() · ‖v‖``."""
        c = self.D.products.jvp(v)
        return float((self._solve(v, c, "exact") - self._solve(v, c, "weak")).norm())

    def weak_field_bound(self) -> float:
        """``‖(I + εD)⁻¹ − (I − εD)‖₂ ≤ (ελ_max)² / (1 + ελ_max)``.

        Both operators share D's eigenvectors; on an eigenvalue λ the difference is
        ``1/(1+ελ) − 1 + ελ = (ελ)²/(1+ελ)``, which grows with λ, so its largest value, at
        ``λ_max``, is the operator norm (an equality, not only a bound).
        """
        x = float(self.eps) * self.lambda_max
        return x * x / (1 + x)
