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

:class:`DiffusionMatrix` is an :class:`~sgdgeom.linalg.Operator`: it implements its
products, and everything it computes on the way is public: the per-sample gradients and
their squared norms, ``diag(D)`` (the per-coordinate gradient variance) and, with
``centered=False``, the uncentred second moment :math:`\frac1N\sum_i g_i g_i^\top` (the
empirical Fisher). The notation is that of ``docs/design.md``.

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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sgdgeom._deprecated import moved
from sgdgeom.errors import InputError
from sgdgeom.linalg import (
    Eigenpairs,
    MethodChoice,
    Operator,
    lanczos_top,
    top_eigenvalue,
)
from sgdgeom.params import ParamSpace
from sgdgeom.persample import (
    CacheMode,
    DataSource,
    LossSpec,
    PerSampleProducts,
    Route,
    ShardedProducts,
    make_products,
    route_of,
)
from sgdgeom.persample.storage import available_bytes
from sgdgeom.precision import in_full_precision

__all__ = [
    "DiffusionMatrix",
    "Divergence",
    "LayerBlock",
    "LayerTrace",
    "gram_spectrum_bytes",
]

__getattr__ = moved(
    "sgdgeom.diffusion",
    {
        name: "sgdgeom.linalg"
        for name in (
            "bound_squarings",
            "compiled_bounds",
            "conjugate_gradients",
            "lanczos_top",
            "top_eigenvalue",
            "top_eigenvalue_bounds",
        )
    },
)

ROWS_LIMIT = 2**31  # bytes of per-sample gradients that per_sample_gradients() returns whole


@dataclass(frozen=True)
class LayerTrace:
    """The trace of a layer's diagonal block ``D_I``: ``trace = tr D_I``, ``numel = N_I``
    (the scalars it sums over) and ``per_param = tr D_I / N_I``, the layer's diffusion
    temperature (``docs/design.md``, Musso eq. 2)."""

    trace: float
    numel: int

    @property
    def per_param(self) -> float:
        return self.trace / self.numel


@in_full_precision
class DiffusionMatrix(Operator):
    """The diffusion matrix ``D`` of a model's per-sample losses on a dataset (F2, F3).

    Args:
        model: any ``nn.Module``; BatchNorm and Dropout must be in eval mode. ``D`` is that
            of the parameters at construction time; frozen parameters are not part of it.
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, a matching loss
            module or ``torch.nn.functional`` function (mapped to its per-sample form), or a
            function ``(output, target) -> (B,)`` per-sample losses.
        data: a batch ``(x, y)`` or a DataLoader over the dataset (``shuffle=False``),
            streamed in chunks.
        route: how the per-sample products are computed: ``"capture"`` (layer rules on one
            captured forward and backward, with a module-local torch.func fallback for
            modules without a rule; refused, naming the parameter, where a weight is used
            outside its module), ``"generic"`` (torch.func on the whole model, exact for any
            model) or ``"auto"`` (capture where it is exact, else generic, with a warning).
        chunk_size: samples per chunk (``None``: a batch is one chunk).
        cache: where the capture route keeps layer inputs and output gradients
            (``O(N x widths)``, never ``N x d``): ``"auto"`` in memory when they fit, else
            in memory-mapped files under ``cache_dir`` if given, else captured again on
            every product; ``"memory"``, ``"disk"`` (under ``cache_dir``) or ``"off"``
            (:meth:`~sgdgeom.persample.CaptureProducts.from_model`).
        cache_dir: a folder for memory-mapped captures (a private subfolder is made, and
            removed with the products).
        distributed: ``data`` is this process's shard of the samples
            (``torch.distributed``): D is that of all the shards together, identical on
            every rank (:class:`~sgdgeom.persample.ShardedProducts`).
        centered: ``False`` gives the uncentred second moment ``(1/N) Σ_i g_i g_iᵀ`` (the
            empirical Fisher) in place of the covariance: the same products without the
            mean removed, of rank at most ``N``.
        progress: show progress bars while streaming the data.

    Vectors are flat tensors of shape ``(d,)`` in ``model.named_parameters()`` order
    (see :class:`~sgdgeom.params.ParamSpace`); ``D @ v`` also accepts a dict by name, or a
    ``(d, k)`` matrix of k vectors.
    """

    symbol = "D"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec = "cross_entropy",
        data: Any = None,
        *,
        route: Route = "auto",
        chunk_size: int | None = 1024,
        cache: CacheMode = "auto",
        cache_dir: str | Path | None = None,
        distributed: bool = False,
        centered: bool = True,
        progress: bool = False,
    ) -> None:
        if data is None:
            raise InputError("data is required: a batch (x, y) or a DataLoader")
        self.space = ParamSpace(model)
        source = DataSource(data, chunk_size, self.space.device)
        products = make_products(
            model,
            loss_fn,
            source,
            route=route,
            cache=cache,
            cache_dir=cache_dir,
            progress=progress,
        )
        self.products: PerSampleProducts = ShardedProducts(products) if distributed else products
        self.n = self.products.n
        self.centered = centered

    @classmethod
    def from_products(
        cls,
        products: PerSampleProducts,
        mean_gradient: Tensor | None = None,
        *,
        centered: bool = True,
    ) -> DiffusionMatrix:
        """A diffusion matrix over products already at hand (e.g. a training minibatch);
        ``mean_gradient``, if known (the ``.grad`` of a backward pass), saves one VJP."""
        self = cls.__new__(cls)
        self.space, self.products, self.n = products.space, products, products.n
        self.centered = centered
        if mean_gradient is not None:
            self._mean_gradient = mean_gradient
        return self

    @property
    def route(self) -> str:
        """``"generic"`` (torch.func), ``"capture"`` (layer rules) or ``"rows"`` (explicit
        per-sample gradients); that of each process's shard under ``distributed=True``."""
        return route_of(self.products)

    def __repr__(self) -> str:
        kind = "" if self.centered else ", centered=False"
        return f"DiffusionMatrix(d={self.space.dim}, N={self.n}, route={self.route!r}{kind})"

    # ------------------------------------------------------------------ products

    def _center(self, c: Tensor, dim: int = 0) -> Tensor:
        """``c − c̄`` along ``dim`` (covariance), or ``c`` itself (second moment)."""
        return c - c.mean(dim) if self.centered else c

    def _matvec(self, v: Tensor) -> Tensor:
        """``D v = (1/N) Gᵀ (c - c̄)`` with ``c = G v``: one JVP and one VJP, ``(d,) -> (d,)``."""
        c = self.products.jvp(v)
        return self.products.vjp(self._center(c) / self.n)  # scaled in (N,), not in (d,)

    def _matmat(self, V: Tensor) -> Tensor:
        """``D V`` for ``m`` vectors: one batched JVP and one batched VJP, a single pass over
        the data."""
        C = self.products.jvp_batch(V)
        return self.products.vjp_batch(self._center(C) / self.n)

    @cached_property
    def _mean_gradient(self) -> Tensor:
        ones = torch.full((self.n,), 1.0 / self.n, dtype=self.space.dtype, device=self.space.device)
        return self.products.vjp(ones)

    def mean_gradient(self) -> Tensor:
        """``ḡ = ∇f = (1/N) Σ_i g_i``, shape ``(d,)``."""
        return self._mean_gradient

    # ------------------------------------------------------------------ per-sample quantities

    def per_sample_gradients(self) -> Tensor:
        """The per-sample gradients ``G``, ``(N, d)`` (rows in sample order). It materialises
        ``N x d`` numbers, so it is refused above 2 GiB: stream them with
        ``D.products.per_sample_grads()`` instead."""
        needed = self.n * self.space.dim * torch.empty((), dtype=self.space.dtype).element_size()
        if needed > ROWS_LIMIT:
            raise InputError(
                f"the {self.n:,} x {self.space.dim:,} per-sample gradients take "
                f"{needed / 2**30:.1f} GiB (limit {ROWS_LIMIT / 2**30:.0f} GiB): stream them "
                f"in chunks with D.products.per_sample_grads()"
            )
        out = torch.empty(self.n, self.space.dim, dtype=self.space.dtype, device=self.space.device)
        for start, rows in self.products.per_sample_grads():
            out[start : start + len(rows)] = rows
        return out

    @cached_property
    def _sq_norms(self) -> Tensor:
        return self.products.sq_norms()

    def sq_norms(self) -> dict[str, Tensor]:
        """``‖g_{i,p}‖²`` of every sample i, by parameter name p: ``{name: (N,)}``, by the
        layer rules' ghost norms where they have one (never ``N x d`` for a Linear layer)."""
        return dict(zip(self.space.names, self._sq_norms.T, strict=True))

    def sample_sq_norms(self) -> Tensor:
        """``‖g_i‖²`` of every sample, ``(N,)``: the raw Gram matrix's diagonal when it has
        been built, else the rules' squared norms summed over the parameters."""
        if self.has_gram:
            return self._raw_diagonal
        return self._sq_norms.sum(1)

    def diagonal(self) -> Tensor:
        """``diag(D)``, ``(d,)``: every coordinate's variance over the samples,
        ``(1/N) Σ_i g_i² − ḡ²`` (the second moment ``(1/N) Σ_i g_i²`` with
        ``centered=False``)."""
        second = self.products.square_sum() / self.n
        return (second - self._mean_gradient.square()).clamp_min(0) if self.centered else second

    # ------------------------------------------------------------------ Gram and spectrum

    def gradient_products(self) -> Tensor:
        """``c = G ḡ``, the per-sample ``g_i · ḡ``, ``(N,)``: the row means of the raw Gram
        matrix when it has been built (``g_i·ḡ = (1/N) Σ_j g_i·g_j``), else one JVP."""
        if self.has_gram:
            return self._raw_row_means
        return self.products.jvp(self._mean_gradient)

    @property
    def has_gram(self) -> bool:
        """Whether the ``N x N`` Gram matrix has been built (and is held)."""
        return "_gram" in self.__dict__

    @cached_property
    def _gram(self) -> Tensor:
        """``K``, centred and symmetrised in place over the raw Gram matrix, so that the
        only ``N x N`` matrix held is K itself."""
        _check_gram_memory(self.n, self.space.dtype, self.space.device)
        K = self.products.gram()
        row = K.mean(0)
        self._raw_row_means = row
        self._raw_diagonal = K.diagonal().clone()
        if self.centered:
            K.sub_(row).sub_(row[:, None]).add_(row.mean())
        _symmetrise_(K)
        return K.div_(self.n)

    def gram(self) -> Tensor:
        """The centred Gram matrix ``K = (1/N) G_c G_cᵀ``, ``(N, N)``, whose eigenvalues are
        the nonzero eigenvalues of D (``(1/N) G Gᵀ`` with ``centered=False``). For Linear
        layers it is built from inner products of layer inputs and output gradients,
        ``(a_i·a_j)(δ_i·δ_j)``, without forming G."""
        return self._gram

    def _spectral_copy(self) -> Tensor:
        """K in the precision of its eigendecomposition: float64, except a float32 K on a
        GPU, decomposed in float32 (float64 is slow there, and K holds float32 rounding)."""
        if self._gram.device.type == "cuda" and self._gram.dtype == torch.float32:
            return self._gram
        return self._gram.double()

    @cached_property
    def _eigvalsh(self) -> Tensor:
        values: Tensor = torch.linalg.eigvalsh(self._spectral_copy())
        return values.flip(0).double()

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
            w = self._center(w).to(self.space.dtype)
            columns.append(self.products.vjp(w) / math.sqrt(self.n * float(lam)))
        return values.to(self.space.dtype), torch.stack(columns, 1)

    def eigsh(self, k: int, method: MethodChoice = "auto", **options: Any) -> Eigenpairs:
        """The top-k eigenpairs of D from products alone, never forming D or K.

        ``method`` is ``"block-lanczos"`` (block Krylov, ``k + oversample`` vectors per
        pass, or ``block``), ``"randomized"`` (subspace iteration with Rayleigh–Ritz),
        ``"lanczos"`` (scipy's ARPACK, one vector per pass) or ``"auto"``: single-vector
        Lanczos on the CPU in one process (it needs the fewest products, whatever the
        route), block Lanczos where a pass costs more than its products (an accelerator,
        whose launches a block amortises; several processes, which synchronise on every
        pass: :meth:`~sgdgeom.linalg.Operator.preferred_method`); ``options`` are those of
        :func:`~sgdgeom.linalg.top_eigenpairs` (``tol``, ``oversample``, ``block``,
        ``max_passes``, ``seed``, ``progress``). A block pass is one batched JVP and one
        batched VJP over the data (on the capture route, one matmul per layer for all
        vectors). Returns :class:`~sgdgeom.linalg.Eigenpairs`: values ``(k,)`` descending,
        eigenvectors ``(d, k)``, each pair's residual ``‖D u − λ u‖`` and the cost in passes
        and vector products; it unpacks as ``values, vectors``."""
        rank_bound = self.n - 1 if self.centered else self.n
        self._check_k(k, min(rank_bound, self.space.dim - 1))
        return super().eigsh(k, method, **options)

    def _passes_are_cheap(self) -> bool:
        """On the CPU in one process (several synchronise on every pass)."""
        return super()._passes_are_cheap() and not isinstance(self.products, ShardedProducts)

    @staticmethod
    def _check_k(k: int, limit: int) -> None:
        if not 1 <= k <= limit:
            raise InputError(f"k must be in 1..{limit}, got {k}")

    def lambda_max(self, tol: float | None = None, matrix_free: bool = False) -> float:
        """The largest eigenvalue of D, through the Gram matrix: from its full spectrum
        (``tol=None``, or when that is already computed), else by Lanczos on K to a
        residual of ``tol · λ`` (:func:`~sgdgeom.linalg.top_eigenvalue`), much cheaper for
        a one-off.

        ``matrix_free=True`` (with a ``tol``, and no Gram matrix built yet) runs the same
        Lanczos on the operator K (:meth:`gram_matvec`: a VJP and a JVP per step, never
        ``N x N``); its residual cannot fall below the rounding of the products, so ``tol``
        is raised to ``64 ε`` of the dtype (7.6e-6 in float32). The products it took are
        kept in ``lanczos_steps``."""
        if tol is None or "_eigvalsh" in self.__dict__:
            return float(self.eigvalsh()[0])
        found = self.__dict__.setdefault("_top_eigenvalues", {})
        if tol not in found:
            if matrix_free and not self.has_gram:
                floor = 64 * torch.finfo(self.space.dtype).eps
                found[tol], self.lanczos_steps = lanczos_top(
                    self._gram_matvec_numpy, self.n, max(tol, floor)
                )
            else:
                found[tol] = top_eigenvalue(self._gram, tol)
        value: float = found[tol]
        return value

    def gram_matvec(self, w: Tensor) -> Tensor:
        """``K w = (1/N) C G Gᵀ C w`` (``C`` the centring) without K: one VJP and one JVP,
        ``(N,) -> (N,)`` in D's dtype."""
        c = self.products.jvp(self.products.vjp(self._center(w) / self.n, out=self._scratch()))
        return self._center(c)

    def _gram_matvec_numpy(self, q: np.ndarray) -> np.ndarray:
        w = torch.from_numpy(q).to(self.space.device, self.space.dtype)
        result: np.ndarray = self.gram_matvec(w).double().cpu().numpy()
        return result

    def _scratch(self) -> Tensor:
        """A ``(d,)`` buffer kept for the VJPs of repeated :meth:`gram_matvec` calls."""
        buffer = self.__dict__.get("_vjp_buffer")
        if buffer is None:
            buffer = self._vjp_buffer = torch.empty(
                self.space.dim, dtype=self.space.dtype, device=self.space.device
            )
        return buffer

    # ------------------------------------------------------------------ traces and ranks

    def _param_traces(self) -> Tensor:
        """``tr`` of each parameter tensor's diagonal block: ``(1/N) Σ_i ‖g_ip‖² − ‖ḡ_p‖²``."""
        mean_sq = self._sq_norms.mean(0)
        if not self.centered:
            return mean_sq
        g = self._mean_gradient
        bar_sq = torch.stack([g[self.space.slice(n)].square().sum() for n in self.space.names])
        return (mean_sq - bar_sq).clamp_min(0)

    def param_traces(self) -> dict[str, float]:
        """``tr`` of each parameter tensor's diagonal block, by name."""
        return dict(zip(self.space.names, self._param_traces().tolist(), strict=True))

    def trace(self, probes: int | None = None, seed: int = 0) -> float:
        """``tr D = (1/N) Σ_i ‖g_i − ḡ‖²``, exactly: ``tr K`` when the Gram matrix is built,
        else from per-sample squared norms (no Gram matrix). With ``probes``, Hutchinson's
        estimate instead (:meth:`~sgdgeom.linalg.Operator.trace`)."""
        if probes is not None:
            return super().trace(probes, seed)
        return float(self.trace_tensor())

    def trace_tensor(self) -> Tensor:
        """:meth:`trace` as a 0-d tensor on D's device, read by nobody on the host."""
        if self.has_gram:
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

    # ------------------------------------------------------------------ divergence and blocks

    def divergence(
        self, probes: int | None = None, seed: int = 0, progress: bool = False
    ) -> Divergence:
        """``∇·D``, the divergence of D as a field over parameter space, ``(d,)``:
        ``(∇·D)_k = Σ_j ∂_j D_jk``, which the current of Fioresi et al.'s (F12) needs.

        From ``D = (1/N) Σ_i g_i g_iᵀ − ḡ ḡᵀ`` (``docs/design.md``)::

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
        if not self.centered:
            raise InputError("divergence() is that of the covariance D: build it centered")
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
        mean = torch.zeros(space.dim, dtype=space.dtype, device=space.device)
        squares = torch.zeros_like(mean)  # Welford: O(d) memory for any number of probes
        for k in tqdm(range(1, probes + 1), desc="Hutchinson probes", disable=not progress):
            signs = torch.randint(0, 2, (space.dim,), generator=generator) * 2 - 1
            quadratic = products.second_directional(signs.to(space.device, space.dtype))
            estimate = products.vjp((quadratic - quadratic.mean()) / n)
            delta = estimate - mean
            mean += delta / k
            squares += delta * (estimate - mean)
        stderr = (squares / (probes - 1)).sqrt() / math.sqrt(probes)
        return Divergence(mean + half_grad_trace, stderr, probes)

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


@in_full_precision
class LayerBlock(Operator):
    """The diagonal block ``D_I = P_I D P_Iᵀ`` of one layer: the covariance of the per-sample
    gradients restricted to the layer's parameters, an operator on the flat ``(d_I,)``
    vectors of :attr:`space` (the layer's parameters in order)."""

    symbol = "D_I"

    def __init__(self, parent: DiffusionMatrix, layer: str) -> None:
        self.parent = parent
        self.layer = layer
        self.space = parent.space.subspace(parent.space.layer_params(layer))
        self.mask = parent.space.layer_mask(layer)
        self.dim = self.space.dim

    def __repr__(self) -> str:
        return f"LayerBlock({self.layer!r}, d_I={self.dim})"

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.parent.space.dim, V.shape[1], dtype=V.dtype, device=V.device)
        full[self.mask] = V
        return self.parent._matmat(full)[self.mask]

    def _passes_are_cheap(self) -> bool:
        return self.parent._passes_are_cheap()

    def param_traces(self) -> dict[str, float]:
        """``tr`` of each of the layer's parameter tensors' diagonal blocks, by name."""
        traces = self.parent.param_traces()
        return {name: traces[name] for name in self.space.names}

    def trace(self, probes: int | None = None, seed: int = 0) -> float:
        """``tr D_I``, exactly (Hutchinson's estimate with ``probes``)."""
        if probes is not None:
            return super().trace(probes, seed)
        return sum(self.param_traces().values())


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
