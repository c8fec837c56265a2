r"""The diffusion matrix of SGD: the covariance of the per-sample gradients, as an operator.

Fioresi, Chaudhari, Soatto (2020), eq. (2)-(3):

.. math::

    D = \frac1N \sum_i (g_i - \bar g)(g_i - \bar g)^\top
      = \frac1N \sum_i g_i g_i^\top - \bar g \bar g^\top
      = \frac{1}{N^2} \langle \partial_r \hat f, \partial_s \hat f \rangle,

with :math:`g_i = \nabla f_i` the per-sample gradients (``d`` entries each) and
:math:`\bar g = \nabla f` their mean. D is ``d x d``, symmetric positive semi-definite, of
rank at most ``N - 1`` (F3), and zero iff all :math:`g_i` are equal. It is never formed:

- ``D @ v = (1/N) Σ_i (c_i - c̄) g_i`` with ``c = G v`` (one JVP, then one VJP);
- the centred Gram matrix ``K = (1/N) G_c G_cᵀ`` (``N x N``) has exactly the nonzero
  eigenvalues of D, and its eigenvectors ``w`` map to D's as ``u = G_cᵀ w / sqrt(N λ)``.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    >>> D = DiffusionMatrix(model, "cross_entropy", (x, y))
    >>> D.shape, D.rank() <= 15
    ((67, 67), True)
    >>> v = torch.randn(67, dtype=torch.float64)
    >>> bool(torch.allclose(D @ v, D.dense() @ v))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sgdgeom.eigen import Eigenpairs, operator_eigenpairs
from sgdgeom.errors import InputError
from sgdgeom.params import ParamSpace
from sgdgeom.persample import (
    CaptureProducts,
    DataSource,
    FuncProducts,
    LossSpec,
    PerSampleProducts,
    ShardedProducts,
    make_products,
)
from sgdgeom.persample.storage import available_bytes

__all__ = [
    "DiffusionMatrix",
    "Divergence",
    "LayerBlock",
    "LayerTrace",
    "conjugate_gradients",
    "lanczos_top",
    "top_eigenvalue",
    "top_eigenvalue_bounds",
    "compiled_bounds",
    "bound_squarings",
]

DENSE_LIMIT = 8192  # dense() refuses d above this (a d x d float64 matrix of 512 MiB)


@dataclass(frozen=True)
class LayerTrace:
    """The trace of a layer's diagonal block ``D_I``: ``trace = tr D_I``, ``numel = N_I``
    (the scalars it sums over) and ``per_param = tr D_I / N_I``, the layer's diffusion
    temperature (DESIGN §1, Musso eq. 2)."""

    trace: float
    numel: int

    @property
    def per_param(self) -> float:
        return self.trace / self.numel


class DiffusionMatrix:
    """The diffusion matrix ``D`` of a model's per-sample losses on a dataset (F2, F3).

    Args:
        model: any ``nn.Module``; BatchNorm and Dropout must be in eval mode. ``D`` is that
            of the parameters at construction time; frozen parameters are not part of it.
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, a matching loss
            module or ``torch.nn.functional`` function (mapped to its per-sample form), or a
            function ``(output, target) -> (B,)`` per-sample losses.
        data: a batch ``(x, y)`` or a DataLoader over the dataset (``shuffle=False``),
            streamed in chunks.
        route: ``"capture"`` (layer rules on one captured forward and backward, with a
            module-local torch.func fallback for modules without a rule; refused, naming the
            parameter, where a weight is used outside its module), ``"generic"`` (torch.func
            on the whole model, exact for any model) or ``"auto"`` (capture where it is
            exact, else generic, with a warning).
        chunk_size: samples per chunk (``None``: a batch is one chunk).
        cache: the capture route keeps layer inputs and output gradients (``O(N x widths)``,
            never ``N x d``): ``"auto"`` in memory when they fit, else in memory-mapped files
            under ``cache_dir`` if given, else it captures again on every product; ``True``
            in memory, ``"disk"`` under ``cache_dir``, ``False`` never
            (:meth:`~sgdgeom.persample.CaptureProducts.from_model`).
        cache_dir: a folder for memory-mapped captures (a private subfolder is made, and
            removed with the products).
        distributed: ``data`` is this process's shard of the samples
            (``torch.distributed``): D is that of all the shards together, identical on
            every rank (:class:`~sgdgeom.persample.ShardedProducts`).
        progress: show progress bars while streaming the data.

    Vectors are flat tensors of shape ``(d,)`` in ``model.named_parameters()`` order
    (see :class:`~sgdgeom.params.ParamSpace`); ``D @ v`` also accepts a dict by name, or a
    ``(d, k)`` matrix of k vectors.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec = "cross_entropy",
        data: Any = None,
        *,
        route: str = "auto",
        chunk_size: int | None = 1024,
        cache: bool | str = "auto",
        cache_dir: str | Path | None = None,
        distributed: bool = False,
        progress: bool = False,
    ) -> None:
        if data is None:
            raise InputError("data is required: a batch (x, y) or a DataLoader")
        self.space = ParamSpace(model)
        source = DataSource(data, chunk_size, self.space.device)
        self.products: PerSampleProducts = make_products(
            model,
            loss_fn,
            source,
            route=route,
            cache=cache,
            cache_dir=cache_dir,
            progress=progress,
        )
        if distributed:
            self.products = ShardedProducts(self.products)
        self.n = self.products.n

    @classmethod
    def from_products(
        cls, products: PerSampleProducts, mean_gradient: Tensor | None = None
    ) -> DiffusionMatrix:
        """A diffusion matrix over products already at hand (e.g. a training minibatch);
        ``mean_gradient``, if known (the ``.grad`` of a backward pass), saves one VJP."""
        self = cls.__new__(cls)
        self.space, self.products, self.n = products.space, products, products.n
        if mean_gradient is not None:
            self._mean_gradient = mean_gradient
        return self

    @property
    def route(self) -> str:
        """``"generic"`` (torch.func), ``"capture"`` (layer rules) or ``"rows"`` (explicit
        per-sample gradients); that of each process's shard under ``distributed=True``."""
        products = self.products
        if isinstance(products, ShardedProducts):
            products = products.local
        if isinstance(products, FuncProducts):
            return "generic"
        return "capture" if isinstance(products, CaptureProducts) else "rows"

    def __repr__(self) -> str:
        return f"DiffusionMatrix(d={self.space.dim}, N={self.n}, route={self.route!r})"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.space.dim, self.space.dim)

    # ------------------------------------------------------------------ products

    def matvec(self, v: Tensor) -> Tensor:
        """``D v = (1/N) Gᵀ (c - c̄)`` with ``c = G v``: one JVP and one VJP, ``(d,) -> (d,)``.
        ``v`` must have D's dtype and device (see :meth:`ParamSpace.check_vector`)."""
        self.space.check_vector(v)
        c = self.products.jvp(v)
        return self.products.vjp((c - c.mean()) / self.n)  # scaled in (N,), not in (d,)

    def matmat(self, V: Tensor) -> Tensor:
        """``D V`` for ``m`` vectors at once, ``(d, m) -> (d, m)``: one batched JVP and one
        batched VJP, a single pass over the data (see :meth:`matvec`)."""
        if V.dim() != 2 or V.shape[0] != self.space.dim:
            raise InputError(f"V must be a ({self.space.dim}, m) tensor, got {tuple(V.shape)}")
        self.space.check_vector(V[:, 0])
        C = self.products.jvp_batch(V)
        return self.products.vjp_batch((C - C.mean(0)) / self.n)

    def __matmul__(self, v: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """``D @ v`` for a ``(d,)`` vector, a ``(d, k)`` matrix (one pass, :meth:`matmat`) or
        a dict by parameter name."""
        if isinstance(v, Tensor) and v.dim() == 2:
            return self.matmat(v)
        return self.space.apply(self.matvec, v)

    @cached_property
    def _mean_gradient(self) -> Tensor:
        ones = torch.full((self.n,), 1.0 / self.n, dtype=self.space.dtype, device=self.space.device)
        return self.products.vjp(ones)

    def mean_gradient(self) -> Tensor:
        """``ḡ = ∇f = (1/N) Σ_i g_i``, shape ``(d,)``."""
        return self._mean_gradient

    # ------------------------------------------------------------------ Gram and spectrum

    def gradient_products(self) -> Tensor:
        """``c = G ḡ``, the per-sample ``g_i · ḡ``, ``(N,)``: the row means of the raw Gram
        matrix when it has been built (``g_i·ḡ = (1/N) Σ_j g_i·g_j``), else one JVP."""
        if "_gram" in self.__dict__:
            return self._raw_row_means
        return self.products.jvp(self._mean_gradient)

    @cached_property
    def _gram(self) -> Tensor:
        """``K``, centred and symmetrised in place over the raw Gram matrix, so that the
        only ``N x N`` matrix held is K itself."""
        _check_gram_memory(self.n, self.space.dtype, self.space.device)
        K = self.products.gram()
        row = K.mean(0)
        self._raw_row_means = row
        K.sub_(row).sub_(row[:, None]).add_(row.mean())
        _symmetrise_(K)
        return K.div_(self.n)

    def gram(self) -> Tensor:
        """The centred Gram matrix ``K = (1/N) G_c G_cᵀ``, ``(N, N)``, whose eigenvalues are
        the nonzero eigenvalues of D. For Linear layers it is built from inner products of
        layer inputs and output gradients, ``(a_i·a_j)(δ_i·δ_j)``, without forming G."""
        return self._gram

    def _spectral_copy(self) -> Tensor:
        """K in the precision of its eigendecomposition: float64, except a float32 K on a
        GPU, decomposed in float32 (float64 is slow there, and K holds float32 rounding)."""
        if self._gram.device.type == "cuda" and self._gram.dtype == torch.float32:
            return self._gram
        return self._gram.double()

    @cached_property
    def _eigvalsh(self) -> Tensor:
        return torch.linalg.eigvalsh(self._spectral_copy()).flip(0).double()

    @cached_property
    def _eigh(self) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(self._spectral_copy())
        return values.flip(0).double(), vectors.flip(1).double()

    def eigvalsh(self) -> Tensor:
        """All ``N`` eigenvalues of K in descending order, float64: D's nonzero spectrum
        followed by (numerical) zeros; D's remaining ``d - N`` eigenvalues are zero."""
        return self._eigvalsh

    def eigh(self, k: int) -> tuple[Tensor, Tensor]:
        """The top-k eigenpairs of D through the Gram matrix: values ``(k,)`` and orthonormal
        eigenvectors ``(d, k)``, ``u = G_cᵀ w / sqrt(N λ)`` (exact, k VJPs)."""
        self._check_k(k, self.n)
        values, vectors = self._eigh[0][:k], self._eigh[1][:, :k]
        if bool((values <= 0).any()):
            raise InputError(f"D has only {self.rank()} nonzero eigenvalues; ask for k <= that")
        columns = []
        for lam, w in zip(values, vectors.T, strict=True):
            w = (w - w.mean()).to(self.space.dtype)
            columns.append(self.products.vjp(w) / math.sqrt(self.n * float(lam)))
        return values.to(self.space.dtype), torch.stack(columns, 1)

    def eigsh(self, k: int, method: str = "block-lanczos", **options: Any) -> Eigenpairs:
        """The top-k eigenpairs of D from products alone, never forming D or K.

        ``method`` is ``"block-lanczos"`` (block Krylov, ``k + oversample`` vectors per
        pass, or ``block``), ``"randomized"`` (subspace iteration with Rayleigh–Ritz) or
        ``"lanczos"`` (scipy's ARPACK, one vector per pass); ``options`` are those of
        :func:`~sgdgeom.eigen.top_eigenpairs` (``tol``, ``oversample``, ``block``,
        ``max_passes``, ``seed``, ``progress``). A block pass is one batched JVP and one
        batched VJP over the data (on the capture route, one matmul per layer for all
        vectors). Returns :class:`~sgdgeom.eigen.Eigenpairs`: values ``(k,)`` descending,
        eigenvectors ``(d, k)``, each pair's residual ``‖D u − λ u‖`` and the cost in passes
        and vector products; it unpacks as ``values, vectors``."""
        self._check_k(k, min(self.n - 1, self.space.dim - 1))
        return operator_eigenpairs(self, k, method, **options)

    @staticmethod
    def _check_k(k: int, limit: int) -> None:
        if not 1 <= k <= limit:
            raise InputError(f"k must be in 1..{limit}, got {k}")

    def lambda_max(self, tol: float | None = None, matrix_free: bool = False) -> float:
        """The largest eigenvalue of D, through the Gram matrix: from its full spectrum
        (``tol=None``, or when that is already computed), else by Lanczos on K to a
        residual of ``tol · λ`` (:func:`top_eigenvalue`), much cheaper for a one-off.

        ``matrix_free=True`` (with a ``tol``, and no Gram matrix built yet) runs the same
        Lanczos on the operator K (:meth:`gram_matvec`: a VJP and a JVP per step, never
        ``N x N``); its residual cannot fall below the rounding of the products, so ``tol``
        is raised to ``64 ε`` of the dtype (7.6e-6 in float32). The products it took are
        kept in ``lanczos_steps``."""
        if tol is None or "_eigvalsh" in self.__dict__:
            return float(self.eigvalsh()[0])
        found = self.__dict__.setdefault("_top_eigenvalues", {})
        if tol not in found:
            if matrix_free and "_gram" not in self.__dict__:
                floor = 64 * torch.finfo(self.space.dtype).eps
                found[tol], self.lanczos_steps = lanczos_top(
                    self._gram_matvec_numpy, self.n, max(tol, floor)
                )
            else:
                found[tol] = top_eigenvalue(self._gram, tol)
        return found[tol]

    def gram_matvec(self, w: Tensor) -> Tensor:
        """``K w = (1/N) C G Gᵀ C w`` (``C`` the centring) without K: one VJP and one JVP,
        ``(N,) -> (N,)`` in D's dtype."""
        c = self.products.jvp(self.products.vjp((w - w.mean()) / self.n, out=self._scratch()))
        return c - c.mean()

    def _gram_matvec_numpy(self, q: np.ndarray) -> np.ndarray:
        w = torch.from_numpy(q).to(self.space.device, self.space.dtype)
        return self.gram_matvec(w).double().cpu().numpy()

    def _scratch(self) -> Tensor:
        """A ``(d,)`` buffer kept for the VJPs of repeated :meth:`gram_matvec` calls."""
        buffer = self.__dict__.get("_vjp_buffer")
        if buffer is None:
            buffer = self._vjp_buffer = torch.empty(
                self.space.dim, dtype=self.space.dtype, device=self.space.device
            )
        return buffer

    # ------------------------------------------------------------------ scalars

    @cached_property
    def _sq_norms(self) -> Tensor:
        return self.products.sq_norms()

    def _param_traces(self) -> Tensor:
        """``tr`` of each parameter tensor's diagonal block: ``(1/N) Σ_i ‖g_ip‖² − ‖ḡ_p‖²``."""
        mean_sq = self._sq_norms.mean(0)
        g = self._mean_gradient
        bar_sq = torch.stack([g[self.space.slice(n)].square().sum() for n in self.space.names])
        return (mean_sq - bar_sq).clamp_min(0)

    def param_traces(self) -> dict[str, float]:
        """``tr`` of each parameter tensor's diagonal block, by name."""
        return dict(zip(self.space.names, self._param_traces().tolist(), strict=True))

    def trace(self) -> float:
        """``tr D = (1/N) Σ_i ‖g_i − ḡ‖²``: ``tr K`` when the Gram matrix is built, else from
        per-sample squared norms (no Gram matrix)."""
        return float(self.trace_tensor())

    def trace_tensor(self) -> Tensor:
        """:meth:`trace` as a 0-d tensor on D's device, read by nobody on the host."""
        if "_gram" in self.__dict__:
            return self._gram.diagonal().sum()
        return self._param_traces().sum()

    def layer_traces(self, weights_only: bool = False) -> dict[str, LayerTrace]:
        """``tr D_I`` and ``N_I`` of every layer (its weights only, if asked)."""
        traces = self._param_traces()
        out = {}
        for layer in self.space.layers:
            names = [
                n
                for n in self.space.layer_params(layer)
                if not (weights_only and self.space.is_bias(n))
            ]
            if names:
                index = [self.space.names.index(n) for n in names]
                out[layer] = LayerTrace(
                    float(traces[index].sum()), self.space.layer_numel(layer, weights_only)
                )
        return out

    def rank(self, tol: float | None = None) -> int:
        """The numerical rank: eigenvalues of K above ``tol``. At most ``N − 1`` (F3).

        The default tolerance is ``N · eps · s`` (numpy's ``matrix_rank`` rule for the
        ``N x N`` matrix K), with ``eps`` that of the model's dtype and
        ``s = max(λ_max, (1/N) Σ_i ‖g_i‖²)``: the uncentred scale bounds the rounding errors
        that centring leaves, so that ``D = 0`` has rank 0 even when ``ḡ ≠ 0``.
        """
        values = self.eigvalsh()
        if tol is None:
            scale = max(float(values[0]), float(self._sq_norms.sum(1).mean()))
            tol = self.n * torch.finfo(self.space.dtype).eps * scale
        return int((values > tol).sum())

    def effective_rank(self) -> float:
        """``exp(H(p))``, ``p = λ / Σλ`` over the ``rank()`` eigenvalues above the rounding
        level (Roy & Vetterli 2007): 1 for a rank-one D, the rank for a flat spectrum."""
        values = self.eigvalsh()[: self.rank()]
        if len(values) == 0:
            return 0.0
        p = values / values.sum()
        return float(torch.exp(-(p * p.log()).sum()))

    # ------------------------------------------------------------------ dense and blocks

    def divergence(
        self, probes: int | None = None, seed: int = 0, progress: bool = False
    ) -> Divergence:
        """``∇·D``, the divergence of D as a field over parameter space, ``(d,)``:
        ``(∇·D)_k = Σ_j ∂_j D_jk``, which the current of Fioresi et al.'s (F12) needs.

        From ``D = (1/N) Σ_i g_i g_iᵀ − ḡ ḡᵀ`` (DESIGN §1)::

            ∇·D = Cov_i(tr H_i, g_i) + ½ ∇ tr D
                = (1/N) Σ_i (t_i − t̄) g_i + (1/N) Σ_i H_i g_i − H̄ ḡ

        with ``t_i = tr H_i``. ``½ ∇ tr D`` takes one gradient of the per-sample gradient
        norms and one Hessian-vector product, exactly. The traces are exact with
        ``probes=None`` (``d`` directional second derivatives: small models), or
        Hutchinson's ``t_i ≈ zᵀ H_i z`` with ``probes`` Rademacher vectors ``z`` shared by
        all samples, which keeps the covariance unbiased; the standard error of each
        coordinate is that of the mean over the probes.

        Needs second derivatives: the generic route (``route="generic"``).
        """
        products, n, space = self.products, self.n, self.space
        weights = torch.full((n,), 1.0 / n, dtype=space.dtype, device=space.device)
        half_grad_trace = products.gradient_norm_gradient(weights) - products.hessian_vector(
            self._mean_gradient, weights
        )
        if probes is None:
            traces = torch.zeros(n, dtype=space.dtype, device=space.device)
            basis = torch.zeros(space.dim, dtype=space.dtype, device=space.device)
            for j in tqdm(range(space.dim), desc="tr H_i", disable=not progress):
                basis[j] = 1.0
                traces += products.second_directional(basis)
                basis[j] = 0.0
            covariance = products.vjp((traces - traces.mean()) / n)
            return Divergence(covariance + half_grad_trace, None, None)
        if probes < 2:
            raise InputError(f"probes must be None (exact) or >= 2, got {probes}")
        generator = torch.Generator().manual_seed(seed)
        estimates = torch.empty(probes, space.dim, dtype=space.dtype, device=space.device)
        for k in tqdm(range(probes), desc="Hutchinson probes", disable=not progress):
            signs = torch.randint(0, 2, (space.dim,), generator=generator) * 2 - 1
            quadratic = products.second_directional(signs.to(space.device, space.dtype))
            estimates[k] = products.vjp((quadratic - quadratic.mean()) / n)
        stderr = estimates.std(0) / math.sqrt(probes)
        return Divergence(estimates.mean(0) + half_grad_trace, stderr, probes)

    def dense(self, limit: int = DENSE_LIMIT) -> Tensor:
        """D as an explicit ``(d, d)`` matrix, from materialised per-sample gradients. For
        small models only: it refuses ``d > limit``."""
        d = self.space.dim
        if d > limit:
            raise InputError(
                f"dense() would form a {d} x {d} matrix (limit {limit}); use D @ v, eigsh(k) "
                f"or gram() instead, or pass a larger limit"
            )
        return _covariance(self.products, self._mean_gradient)

    def block(self, layer: str) -> LayerBlock:
        """The diagonal block ``D_I`` of one layer, as an operator on that layer's vectors."""
        return LayerBlock(self, layer)


@dataclass(frozen=True)
class Divergence:
    """``∇·D`` (:meth:`DiffusionMatrix.divergence`): the ``(d,)`` ``value``, and with
    Hutchinson probes the ``(d,)`` standard error of each coordinate (None when exact)."""

    value: Tensor
    stderr: Tensor | None
    probes: int | None


class LayerBlock:
    """The diagonal block ``D_I = P_I D P_Iᵀ`` of one layer: the covariance of the per-sample
    gradients restricted to the layer's parameters. Vectors are flat ``(d_I,)``."""

    def __init__(self, parent: DiffusionMatrix, layer: str) -> None:
        self.parent = parent
        self.layer = layer
        self.mask = parent.space.layer_mask(layer)
        self.dim = int(self.mask.sum())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.shape[0] != self.dim:
            raise InputError(
                f"layer {self.layer!r} has {self.dim} parameters, got a vector of "
                f"shape {tuple(v.shape)}"
            )
        full = torch.zeros(self.parent.space.dim, *v.shape[1:], dtype=v.dtype, device=v.device)
        full[self.mask] = v
        return (self.parent @ full)[self.mask]

    def param_traces(self) -> dict[str, float]:
        """``tr`` of each parameter tensor's diagonal block, by name."""
        return dict(zip(self.space.names, self._param_traces().tolist(), strict=True))

    def trace(self) -> float:
        return self.parent.layer_traces()[self.layer].trace

    def dense(self, limit: int = DENSE_LIMIT) -> Tensor:
        """The block as an explicit ``(d_I, d_I)`` matrix (small layers only)."""
        if self.dim > limit:
            raise InputError(f"block {self.layer!r} is {self.dim} x {self.dim} (limit {limit})")
        return _covariance(self.parent.products, self.parent.mean_gradient(), self.mask)


def top_eigenvalue(K: Tensor, tol: float = 1e-10) -> float:
    """The largest eigenvalue of a symmetric PSD ``(n, n)`` matrix by Lanczos with full
    reorthogonalisation, in float64 numpy on the CPU (an ``n x n`` problem is too small for
    an accelerator, and torch's per-call overhead would dominate), from a fixed start
    vector, so it is deterministic (:func:`lanczos_top`)."""
    K = K.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(K).all():
        raise InputError(
            "the Gram matrix has NaN or infinite entries: the per-sample gradients are not "
            "finite (a diverged loss?)"
        )
    return lanczos_top(lambda q: K @ q, len(K), tol)[0]


def bound_squarings(n: int, slack: float = 0.01) -> int:
    """The squarings :func:`top_eigenvalue_bounds` takes for an ``(n, n)`` matrix: the
    least ``s`` with ``n^(1/2^s) ≤ 1 + slack``."""
    return max(0, math.ceil(math.log2(math.log(max(n, 2)) / math.log1p(slack))))


def top_eigenvalue_bounds(K: Tensor, slack: float = 0.01) -> tuple[Tensor, Tensor]:
    r"""Bounds ``θ ≤ λ_max(K) ≤ λ̄`` of a symmetric PSD ``(n, n)`` matrix, as 0-d tensors on
    K's device, with no host read: a fixed number ``s`` of squarings, so nothing waits for
    the device (the ``eps="auto"`` of a GPU step, :class:`~sgdgeom.optim.DiffusionMetricSGD`).

    With :math:`p = 2^s` and :math:`T_p = \operatorname{tr} K^p = \sum_i \lambda_i^p`,

    .. math::

        \lambda_{\max} \le \bar\lambda = T_p^{1/p} \le r^{1/p} \lambda_{\max}
        \quad (r = \operatorname{rank} K \le n),

    and ``s`` is the least with :math:`n^{1/p} \le 1 + \text{slack}` (10 squarings at
    ``n = 256`` and the default 1%), whatever the spectrum. Each squaring is rescaled by its
    trace, ``M ← M² / tr M²``, and :math:`\log T_p` is summed in float64 at the end, so nothing
    overflows. ``θ`` is the Rayleigh quotient of K at the column of :math:`M \propto K^p`
    with the largest diagonal entry: a lower bound, as any Rayleigh quotient, and close to
    :math:`\lambda_{\max}` unless the top eigenvalues cluster. Cost: ``s`` products of
    ``n x n`` matrices. A K with NaN or infinite entries gives NaN bounds. Both bounds hold
    up to the rounding of K's dtype (and of TF32, if the caller enabled it for matrix
    products)."""
    n = len(K)
    squarings = bound_squarings(n, slack)
    trace = K.diagonal().sum()
    positive = trace > 0
    M = K / torch.where(positive, trace, 1.0)
    # t_k = tr M², M ← M²/t_k: then log λ̄ = log tr K + Σ_k 2⁻ᵏ log t_k (three kernels a
    # squaring: on a GPU, launches are most of this function's time)
    traces = K.new_empty(squarings)
    for k in range(squarings):
        M = M @ M
        torch.sum(M.diagonal(), dim=0, out=traces[k])
        M /= traces[k]
    weights = torch.exp2(-torch.arange(1, squarings + 1, dtype=torch.float64, device=K.device))
    log_upper = trace.double().log() + (traces.double().log() * weights).sum()
    upper = torch.where(positive, log_upper.exp(), 0.0)
    upper = torch.where(K.isfinite().all(), upper, math.nan)
    u = M.gather(1, M.diagonal().argmax().expand(n, 1))[:, 0]
    lower = (u @ (K @ u)) / (u @ u)
    return torch.where(positive, lower.double(), 0.0), upper


def compiled_bounds(K: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`top_eigenvalue_bounds` through ``torch.compile`` (``mode="reduce-overhead"``:
    a CUDA graph on a GPU), one compilation per size; the bounds are copied out of the
    graph's memory, which the next call reuses."""
    lower, upper = _compiled_bounds()(K)
    return lower.clone(), upper.clone()


@cache
def _compiled_bounds() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    return torch.compile(
        top_eigenvalue_bounds, mode="reduce-overhead", dynamic=False, fullgraph=True
    )


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


def conjugate_gradients(
    matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_steps: int = 100
) -> tuple[Tensor, int]:
    """``x`` with ``A x = b`` for a symmetric positive definite operator, and the number of
    products: conjugate gradients (Hestenes–Stiefel) from ``x = 0`` until ``‖b − A x‖ ≤ tol
    ‖b‖``. For ``A = I + εK`` with ``ελ_max < 1`` the condition number is below 2, and the
    error falls at least 5.8-fold per step (``(√κ − 1)/(√κ + 1) < 0.172``)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    target = tol * tol * rs
    for step in range(max_steps):
        if rs <= target:
            return x, step
        ap = matvec(p)
        alpha = rs / float(p @ ap)
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rs, previous = float(r @ r), rs
        p.mul_(rs / previous).add_(r)
    reached = math.sqrt(rs * tol * tol / target) if target > 0 else math.inf
    raise InputError(
        f"conjugate gradients reached a relative residual of {reached:.2e} "
        f"(asked {tol:.1e}) in {max_steps} steps: the system is not well conditioned "
        f"(ε λ_max close to 1?) or the products are not finite"
    )


def _covariance(products: PerSampleProducts, mean: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ`` from materialised chunks of G (columns in mask)."""
    if mask is not None:
        mean = mean[mask]
    out = torch.zeros(len(mean), len(mean), dtype=mean.dtype, device=mean.device)
    for _, rows in products.per_sample_grads():
        centred = (rows[:, mask] if mask is not None else rows) - mean
        out += centred.T @ centred
    return out / products.n


def _symmetrise_(K: Tensor, block: int = 2048) -> None:
    """``K ← (K + Kᵀ)/2`` in place, block pair by block pair (no ``N x N`` temporary)."""
    n = len(K)
    for i in range(0, n, block):
        for j in range(i, n, block):
            mean = (K[i : i + block, j : j + block] + K[j : j + block, i : i + block].T) / 2
            K[i : i + block, j : j + block] = mean
            if j != i:  # a diagonal block is symmetric already
                K[j : j + block, i : i + block] = mean.T


def gram_spectrum_bytes(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Peak memory of D's full spectrum through the ``N x N`` Gram matrix: K itself, and
    the copy LAPACK decomposes (float64, plus its float64 conversion on the CPU; a float32
    K on a GPU is decomposed in float32)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    on_gpu_float32 = device.type == "cuda" and dtype == torch.float32
    copies = itemsize if on_gpu_float32 else 8 + (8 if itemsize != 8 else 0)
    return n * n * (itemsize + copies)


def _check_gram_memory(n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a Gram matrix whose spectrum would not fit
    (:func:`gram_spectrum_bytes`)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph's capture: checked when its warm-up steps ran
    needed = gram_spectrum_bytes(n, dtype, device)
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InputError(
            f"the {n:,} x {n:,} Gram matrix and its eigendecomposition need about "
            f"{needed / 2**30:.1f} GiB, and {device.type} has {free / 2**30:.1f} GiB free: use "
            f"D.eigsh(k) for the top k eigenpairs (it needs no N x N matrix), or fewer samples"
        )
