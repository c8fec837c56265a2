r"""The generic route: products for any model through ``torch.func``, chunk by chunk.

``G v`` is one forward-mode product (``jvp``) of the per-sample losses, ``Gᵀ w`` one
reverse-mode product (``vjp``), rows of ``G`` a ``vmap`` of ``grad``. Where forward-mode AD
is not implemented for an operator (the fused CPU attention kernel behind
``nn.MultiheadAttention(need_weights=False)``, for one), :func:`jvp_or_double_vjp` first
retries with PyTorch's reference ("math") attention kernel, whose operations all have
forward-mode derivatives, and else takes the reverse-mode way round: ``J v`` is the VJP of
the linear map ``u ↦ Jᵀ u`` with cotangent ``v`` (the "double-VJP trick"), exact and about
twice the cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from sgdgeom.errors import UnsupportedModelError
from sgdgeom.params import ParamSpace
from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.internal import internal_passes
from sgdgeom.persample.losses import LossSpec, per_sample_loss
from sgdgeom.persample.source import DataSource

__all__ = [
    "UNBATCHABLE",
    "FuncProducts",
    "jvp_or_double_vjp",
    "map_samples",
    "needs_loop",
    "reference_kernels",
]

Params = dict[str, Tensor]


def reference_kernels() -> AbstractContextManager:
    """PyTorch's reference ("math") attention kernel, made of ordinary operations: it has
    forward-mode derivatives and ``vmap`` batching rules, which the fused CPU kernel lacks."""
    return sdpa_kernel([SDPBackend.MATH])


UNBATCHABLE: tuple[type[nn.Module], ...] = (nn.RNNBase,)
"""Modules whose forward has no ``vmap`` batching rule (PyTorch's recurrent layers write
into their initial state in place): per-sample computations through them loop over the
samples instead (exact, one small forward and backward per sample)."""


def needs_loop(module: nn.Module) -> bool:
    """Whether ``module`` holds a layer of :data:`UNBATCHABLE`."""
    return any(isinstance(m, UNBATCHABLE) for m in module.modules())


def map_samples(function: Callable[..., Any], in_dims: tuple, loop: bool) -> Callable[..., Any]:
    """``vmap(function, in_dims)``, or with ``loop`` the same map as a Python loop over the
    samples (for :data:`UNBATCHABLE` layers): ``in_dims`` holds, per argument, None, a
    dimension, or a list of those for a list argument; outputs are stacked along dim 0."""
    if not loop:
        return vmap(function, in_dims=in_dims)

    def take(arg: Any, dim: Any, i: int) -> Any:
        if isinstance(dim, list):
            return [take(a, d, i) for a, d in zip(arg, dim, strict=True)]
        return arg if dim is None else arg.select(dim, i)

    def looped(*args: Any) -> Any:
        sizes = {
            a.shape[d]
            for arg, dim in zip(args, in_dims, strict=True)
            for a, d in (zip(arg, dim, strict=True) if isinstance(dim, list) else [(arg, dim)])
            if d is not None
        }
        (n,) = sizes
        outputs = [
            function(*(take(a, d, i) for a, d in zip(args, in_dims, strict=True))) for i in range(n)
        ]
        return tree_map(lambda *parts: torch.stack(parts), outputs[0], *outputs[1:])

    return looped


def _forward_ad_missing(err: NotImplementedError) -> bool:
    text = str(err)
    return "forward AD" in text or "forward-mode" in text or "jvp" in text.lower()


def jvp_or_double_vjp(
    function: Callable[[Params], Tensor], primal: Params, tangent: Params
) -> tuple[Tensor, Tensor]:
    """``(f(p), J_f(p) t)`` by forward-mode AD, or by two reverse-mode products where an
    operator has no forward-mode derivative.

    Examples:
        >>> import torch
        >>> f = lambda p: (p["a"] ** 2).sum(0, keepdim=True)
        >>> p, t = {"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([1.0, 1.0])}
        >>> jvp_or_double_vjp(f, p, t)[1]
        tensor([6.])
    """
    try:
        return _jvp(function, primal, tangent)
    except NotImplementedError as err:
        if not _forward_ad_missing(err):
            raise
    with reference_kernels():
        try:
            return _jvp(function, primal, tangent)
        except NotImplementedError as err:
            if not _forward_ad_missing(err):
                raise
        return double_vjp(function, primal, tangent)


def _jvp(
    function: Callable[[Params], Tensor], primal: Params, tangent: Params
) -> tuple[Tensor, Tensor]:
    value, product = jvp(function, (primal,), (tangent,))[:2]
    return value, product


def double_vjp(
    function: Callable[[Params], Tensor], primal: Params, tangent: Params
) -> tuple[Tensor, Tensor]:
    """``(f(p), J t)`` in reverse mode only: ``u ↦ Jᵀu`` is linear, and its VJP with
    cotangent ``t`` is ``J t``."""
    value, pullback = vjp(function, primal)[:2]
    _, pull_twice = vjp(lambda u: pullback(u)[0], torch.zeros_like(value))[:2]
    (product,) = pull_twice(tangent)
    return value, product


class _OpRecorder(TorchDispatchMode):
    """Records the names of the ATen operators that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def _runs_layer_norm(model: nn.Module, params: Params, constants: Params, x: Tensor) -> bool:
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        functional_call(model, {**params, **constants}, (x,))
    return any(name.startswith(("native_layer_norm", "layer_norm")) for name in recorder.names)


class FuncProducts(PerSampleProducts):
    """Products for any model through ``torch.func``, chunk by chunk over the data.

    The parameters are copied at construction: the products are those of the model at
    that point, whatever happens to the model afterwards. Frozen parameters and buffers are
    constants. Also the second-order products of :class:`PerSampleProducts`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec,
        data: DataSource,
        space: ParamSpace | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.space = space or ParamSpace(model)
        self.loss = per_sample_loss(loss_fn)
        self.data = data
        self.n = data.n
        self.progress = progress
        self.loop = needs_loop(model)  # per-sample maps loop where vmap cannot batch
        named = dict(model.named_parameters())
        self.params: Params = {n: named[n].detach().clone() for n in self.space.names}
        self.constants = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.constants |= dict(model.named_buffers())

    def batch_losses(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(b,)`` of a chunk as a function of the parameters."""
        with internal_passes():
            output = functional_call(self.model, {**params, **self.constants}, (x,))
        return self.loss(output, y)

    def _chunks(self, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
        return self.data.chunks(self.progress, desc)

    def _directional(self, params: Params, x: Tensor, y: Tensor, tangent: Params) -> Tensor:
        """``(g_i(p) · t)`` over a chunk: ``(b,)``."""
        return jvp_or_double_vjp(lambda q: self.batch_losses(q, x, y), params, tangent)[1]

    def _second(self, params: Params, x: Tensor, y: Tensor, tangent: Params) -> Tensor:
        """``tᵀ H_i(p) t`` over a chunk: ``(b,)``, forward-over-reverse per sample (``vmap``).

        Forward-over-forward is not used: PyTorch's second forward-mode derivative of
        ``layer_norm`` is wrong (checked against finite differences, torch 2.13)."""

        def single(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
            gradient = grad(lambda q: self.batch_losses(q, xi[None], yi[None])[0])
            directional = jvp(gradient, (p,), (tangent,))[1]
            return sum((directional[n] * tangent[n]).sum() for n in tangent)

        with reference_kernels():
            return map_samples(single, (None, 0, 0), self.loop)(params, x, y)

    def _over_chunks(self, value: Callable[[Tensor, Tensor], Tensor], desc: str) -> Tensor:
        """The ``(N,)`` vector of per-sample values ``value(x_chunk, y_chunk) -> (b,)``."""
        out = torch.empty(self.n, dtype=self.space.dtype, device=self.space.device)
        for start, x, y in self._chunks(desc):
            values = value(x, y)
            out[start : start + len(values)] = values
        return out

    def jvp(self, v: Tensor) -> Tensor:
        tangent = self.space.unflatten(v)
        return self._over_chunks(lambda x, y: self._directional(self.params, x, y, tangent), "G v")

    def _weighted_grad(
        self, weights: Tensor, scalar: Callable[[Params, Tensor, Tensor], Tensor], desc: str
    ) -> Tensor:
        """``Σ_i w_i ∇_p s_i(p)`` for per-sample scalars ``s(p, x, y) -> (b,)``: ``(d,)``."""
        total = torch.zeros(self.space.dim, dtype=weights.dtype, device=weights.device)
        for start, x, y in self._chunks(desc):
            w = weights[start : start + len(x)]
            g = grad(lambda p, x=x, y=y, w=w: (w * scalar(p, x, y)).sum())(self.params)
            total += self.space.flatten(g)
        return total

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        total = self._weighted_grad(w, self.batch_losses, "Gᵀ w")
        return out.copy_(total) if out is not None else total

    def second_directional(self, v: Tensor) -> Tensor:
        tangent = self.space.unflatten(v)
        return self._over_chunks(lambda x, y: self._second(self.params, x, y, tangent), "vᵀ H v")

    def hessian_vector(self, v: Tensor, weights: Tensor) -> Tensor:
        return self.hessian_matmat(v[:, None], weights)[:, 0]

    def hessian_matmat(self, V: Tensor, weights: Tensor) -> Tensor:
        """``Σ_i w_i H_i V`` for ``m`` vectors ``(d, m) -> (d, m)``: forward-over-reverse,
        ``vmap``-ped over the vectors, in one pass over the data."""
        tangents = {
            n: V[self.space.slice(n)].T.reshape(-1, *p.shape) for n, p in self.params.items()
        }
        total = torch.zeros_like(V)
        for start, x, y in self._chunks("Σ w H V"):
            w = weights[start : start + len(x)]
            gradient = grad(lambda p, x=x, y=y, w=w: (w * self.batch_losses(p, x, y)).sum())
            with reference_kernels():
                columns = vmap(lambda t, g=gradient: jvp(g, (self.params,), (t,))[1])(tangents)
            total += torch.cat([columns[n].reshape(V.shape[1], -1) for n in self.space.names], 1).T
        return total

    def third_directional(self, v: Tensor, weights: Tensor) -> Tensor:
        """Refused for models whose forward runs ``layer_norm``: PyTorch's third derivatives of
        it are wrong (off by 15% against finite differences, torch 2.13)."""
        _, x, _ = next(self.data.chunks())
        if _runs_layer_norm(self.model, self.params, self.constants, x[:1]):
            raise UnsupportedModelError(
                "this model's forward runs layer_norm, whose third derivatives PyTorch does "
                "not compute correctly; the third-derivative term is refused rather than wrong"
            )
        tangent = self.space.unflatten(v)
        return self._weighted_grad(
            weights, lambda p, x, y: self._second(p, x, y, tangent), "Σ w ∇(vᵀ H v)"
        )

    def _per_sample_grads(self, params: Params, x: Tensor, y: Tensor) -> Params:
        """Every sample's gradient, by parameter name: ``{name: (b, *shape)}``."""

        def single(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
            return self.batch_losses(p, xi[None], yi[None])[0]

        with reference_kernels():
            return map_samples(grad(single), (None, 0, 0), self.loop)(params, x, y)

    def gradient_norm_gradient(self, weights: Tensor) -> Tensor:
        def half_sq_norms(p: Params, x: Tensor, y: Tensor) -> Tensor:
            grads = self._per_sample_grads(p, x, y)
            squares = [g.reshape(len(x), -1).square().sum(1) for g in grads.values()]
            return 0.5 * torch.stack(squares).sum(0)

        with reference_kernels():
            return self._weighted_grad(weights, half_sq_norms, "Σ w H g")

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        for start, x, y in self._chunks("per-sample gradients"):
            grads = self._per_sample_grads(self.params, x, y)
            yield start, torch.cat([grads[n].reshape(len(x), -1) for n in self.space.names], 1)

    def losses(self) -> Tensor:
        with torch.no_grad():
            return self._over_chunks(lambda x, y: self.batch_losses(self.params, x, y), "losses")
