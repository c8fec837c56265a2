r"""Per-sample losses as functions of the parameters, and the products of their gradients.

Notation (DESIGN §1): per-sample losses :math:`f_i(x)`, :math:`i = 1..N`, per-sample
gradients :math:`g_i = \nabla f_i \in \mathbb{R}^d`, stacked as the rows of
:math:`G \in \mathbb{R}^{N \times d}`. :math:`G` is never stored; everything is a product:

- ``jvp(v)``: :math:`c = G v`, shape ``(N,)``, one forward-mode product;
- ``vjp(w)``: :math:`G^\top w`, shape ``(d,)``, one reverse-mode product;
- ``gram()``: the raw Gram matrix :math:`G G^\top`, shape ``(N, N)``;
- ``sq_norms()``: :math:`\|g_{i,p}\|^2` per sample and parameter tensor, ``(N, P)``;
- ``per_sample_grads()``: chunks of rows of :math:`G` (for dense references and small d).

Two routes implement them:

- :class:`FuncProducts`, for any model, through ``torch.func`` (``jvp``, ``vjp``, ``vmap``),
  also giving the per-sample second directional derivatives :math:`v^\top H_i v`.
- :class:`LayerProducts`, for models whose parametrised modules are all ``Linear`` and
  ``Conv2d``. The per-sample gradient of a Linear layer is :math:`\delta_i a_i^\top`
  (:math:`a_i` its input, :math:`\delta_i = \partial f_i / \partial z_i` the gradient at its
  output), so :math:`g_i \cdot v = \delta_i^\top V a_i`, :math:`\sum_i w_i g_i =
  \Delta^\top \mathrm{diag}(w) A` and :math:`g_i \cdot g_j = (a_i \cdot a_j)
  (\delta_i \cdot \delta_j)`. The inputs and output gradients come from one ordinary
  forward and backward pass and are cached when they fit in memory.

Samples must be independent: BatchNorm or Dropout in train mode is an error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F
from tqdm.auto import tqdm

from sgdgeom.errors import SgdgeomError, UnsupportedModelError
from sgdgeom.params import ParamSpace

__all__ = [
    "DataSource",
    "FuncProducts",
    "LayerCapture",
    "LayerProducts",
    "PerSampleProducts",
    "RowProducts",
    "capture_layers",
    "check_independent_samples",
    "fast_route_layers",
    "make_products",
    "per_sample_loss",
]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
LossSpec = str | nn.Module | PerSampleLoss


# --------------------------------------------------------------------------- losses


def _reduce_per_sample(loss: Tensor) -> Tensor:
    return loss.reshape(loss.shape[0], -1).mean(1) if loss.dim() > 1 else loss


def per_sample_loss(loss_fn: LossSpec) -> PerSampleLoss:
    """The per-sample loss ``(output, target) -> (B,)`` of a loss name or module.

    Accepted: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, or an instance of
    ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (its options, e.g.
    label smoothing, are kept). :math:`f_i` is the mean over sample i's elements, so the
    module's ``"mean"`` loss is :math:`f = \\frac1N \\sum_i f_i`.
    """
    names = {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce_with_logits": nn.BCEWithLogitsLoss,
    }
    if isinstance(loss_fn, str):
        if loss_fn not in names:
            raise ValueError(f"unknown loss {loss_fn!r}; choose one of {', '.join(names)}")
        loss_fn = names[loss_fn]()
    if isinstance(loss_fn, tuple(names.values())):
        if getattr(loss_fn, "weight", None) is not None:
            raise UnsupportedModelError(
                "a class-weighted loss is not a mean of per-sample losses; drop `weight`"
            )
        module = copy.copy(loss_fn)
        module.reduction = "none"
        return lambda output, target: _reduce_per_sample(module(output, target))
    if isinstance(loss_fn, nn.Module):
        raise UnsupportedModelError(
            f"unsupported loss module {type(loss_fn).__name__}; use CrossEntropyLoss, MSELoss, "
            f"BCEWithLogitsLoss or a function (output, target) -> per-sample losses (B,)"
        )
    return loss_fn


def check_independent_samples(model: nn.Module) -> None:
    """Raise if a module couples the samples of a batch or makes the model random.

    BatchNorm in train mode normalises with batch statistics, so a sample's loss depends on
    the other samples and per-sample gradients are not defined; Dropout in train mode draws
    a new mask on every pass, so two products would not see the same function.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"BatchNorm layer {name!r} is in train mode, so the samples of a batch are not "
                f"independent; call model.eval() to use its running statistics"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            raise UnsupportedModelError(
                f"Dropout layer {name!r} is in train mode, so the model is random; call "
                f"model.eval() for per-sample products"
            )


# --------------------------------------------------------------------------- data


class DataSource:
    """Chunks of one dataset: a batch ``(x, y)`` or any iterable of batches (a DataLoader).

    Iterating yields ``(start, x, y)``, where ``start`` is the index of the chunk's first
    sample. A loader is streamed on every pass and must yield the same data each time
    (``shuffle=False``); that is checked on every pass.
    """

    def __init__(
        self, data: Any, chunk_size: int | None = None, device: torch.device | None = None
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = device
        self.chunk_size = chunk_size
        self._batch: tuple[Tensor, Tensor] | None = None
        self._loader: Iterable[Any] | None = None
        if (
            isinstance(data, tuple | list)
            and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
        ):
            x, y = data
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(
                    f"x and y must hold the same number (>0) of samples, got {len(x)} and {len(y)}"
                )
            self._batch = (x, y)
            self.n = len(x)
        elif isinstance(data, Iterable):
            self._loader = data
            self._fingerprint: list[tuple[int, float]] | None = None
            for _ in self._iter_loader(None):  # one pass counts the samples
                pass
            self.n = self._n_seen
            if self.n == 0:
                raise ValueError("the data loader yielded no samples")
        else:
            raise TypeError(
                f"data must be a batch (x, y) or an iterable of batches, got {type(data).__name__}"
            )

    def _iter_loader(self, progress: tqdm | None) -> Iterator[tuple[int, Tensor, Tensor]]:
        start, fingerprint = 0, []
        for batch in self._loader or ():
            x, y = batch[0], batch[1]
            fingerprint.append((len(x), float(x.double().sum()) + float(y.double().sum())))
            for offset, xc, yc in self._split(x, y):
                yield start + offset, xc, yc
            start += len(x)
            if progress is not None:
                progress.update(len(x))
        if self._fingerprint is None:
            self._fingerprint, self._n_seen = fingerprint, start
        elif fingerprint != self._fingerprint:
            raise SgdgeomError(
                "the data loader yielded different data on another pass; per-sample products "
                "need a fixed dataset: use shuffle=False and no random augmentation"
            )

    def _split(self, x: Tensor, y: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        size = self.chunk_size or len(x)
        for start in range(0, len(x), size):
            yield start, self._to(x[start : start + size]), self._to(y[start : start + size])

    def _to(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.device is not None else t

    def chunks(
        self, progress: bool = False, desc: str = ""
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, x, y)`` chunks covering the dataset once, in order."""
        with tqdm(total=self.n, disable=not progress, desc=desc, unit="sample", leave=False) as bar:
            if self._batch is not None:
                for start, x, y in self._split(*self._batch):
                    yield start, x, y
                    bar.update(len(x))
            else:
                yield from self._iter_loader(bar)

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        return self.chunks()


# --------------------------------------------------------------------------- interface


class PerSampleProducts:
    """Products with the per-sample gradient matrix ``G`` (``N x d``) of one dataset.

    Subclasses implement :meth:`jvp`, :meth:`vjp`, :meth:`per_sample_grads` and
    :meth:`losses`; :meth:`gram` and :meth:`sq_norms` default to materialising chunks of
    ``G`` and may be overridden by cheaper formulas.
    """

    space: ParamSpace
    n: int
    progress: bool = False

    def jvp(self, v: Tensor) -> Tensor:
        """``G v`` for a flat ``(d,)`` vector: the ``(N,)`` directional derivatives."""
        raise NotImplementedError

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """``Gᵀ w = Σ_i w_i g_i`` for ``w`` of shape ``(N,)``: a flat ``(d,)`` vector, written
        into ``out`` if given (a buffer kept across calls saves allocating ``d`` floats)."""
        raise NotImplementedError

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, G[start:start+b])`` chunks of rows of ``G``, shape ``(b, d)``."""
        raise NotImplementedError

    def losses(self) -> Tensor:
        """The per-sample losses ``(N,)``."""
        raise NotImplementedError

    def gram(self) -> Tensor:
        """The raw Gram matrix ``G Gᵀ``, ``(N, N)``, from pairs of materialised chunks."""
        out = torch.zeros(self.n, self.n, dtype=self.space.dtype, device=self.space.device)
        for i, rows_i in self.per_sample_grads():
            for j, rows_j in self.per_sample_grads():
                if j >= i:
                    block = rows_i @ rows_j.T
                    out[i : i + len(rows_i), j : j + len(rows_j)] = block
                    out[j : j + len(rows_j), i : i + len(rows_i)] = block.T
        return out

    def sq_norms(self) -> Tensor:
        """``‖g_{i,p}‖²`` for every sample i and parameter tensor p: ``(N, P)``."""
        out = torch.zeros(
            self.n, len(self.space.names), dtype=self.space.dtype, device=self.space.device
        )
        for start, rows in self.per_sample_grads():
            sq = rows.square()
            for p, (a, b) in enumerate(
                zip(self.space.offsets[:-1], self.space.offsets[1:], strict=True)
            ):
                out[start : start + len(rows), p] = sq[:, a:b].sum(1)
        return out


# --------------------------------------------------------------------------- generic route


class FuncProducts(PerSampleProducts):
    """Products for any model through ``torch.func``, chunk by chunk over the data.

    The parameters are copied at construction: the products are those of the model at
    that point, whatever happens to the model afterwards.
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
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach().clone() for n in self.space.names}
        self.constants = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.constants |= dict(model.named_buffers())

    def batch_losses(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(b,)`` of a chunk as a function of the parameters."""
        return self.loss(functional_call(self.model, {**params, **self.constants}, (x,)), y)

    def _chunks(self, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
        return self.data.chunks(self.progress, desc)

    def jvp(self, v: Tensor) -> Tensor:
        tangent = self.space.unflatten(v)
        out = torch.empty(self.n, dtype=v.dtype, device=v.device)
        for start, x, y in self._chunks("G v"):
            _, c = jvp(lambda p, x=x, y=y: self.batch_losses(p, x, y), (self.params,), (tangent,))
            out[start : start + len(c)] = c
        return out

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None:
            total = torch.zeros(self.space.dim, dtype=w.dtype, device=w.device)
        else:
            total = out.zero_()
        for start, x, y in self._chunks("Gᵀ w"):
            losses, pullback = vjp(lambda p, x=x, y=y: self.batch_losses(p, x, y), self.params)
            (cotangent,) = pullback(w[start : start + len(losses)])
            total += self.space.flatten(cotangent)
        return total

    def second_directional(self, v: Tensor) -> Tensor:
        """``vᵀ H_i v`` for every sample: ``(N,)``, by forward-over-forward differentiation."""
        tangent = self.space.unflatten(v)
        out = torch.empty(self.n, dtype=v.dtype, device=v.device)
        for start, x, y in self._chunks("vᵀ H v"):

            def directional(p: dict[str, Tensor], x: Tensor = x, y: Tensor = y) -> Tensor:
                return jvp(lambda q: self.batch_losses(q, x, y), (p,), (tangent,))[1]

            _, second = jvp(directional, (self.params,), (tangent,))
            out[start : start + len(second)] = second
        return out

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        def single(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return self.batch_losses(p, x[None], y[None])[0]

        per_sample = vmap(grad(single), in_dims=(None, 0, 0))
        for start, x, y in self._chunks("per-sample gradients"):
            grads = per_sample(self.params, x, y)
            yield start, torch.cat([grads[n].reshape(len(x), -1) for n in self.space.names], 1)

    def losses(self) -> Tensor:
        out = torch.empty(self.n, dtype=self.space.dtype, device=self.space.device)
        with torch.no_grad():
            for start, x, y in self._chunks("losses"):
                values = self.batch_losses(self.params, x, y)
                out[start : start + len(values)] = values
        return out


class RowProducts(PerSampleProducts):
    """Products with an explicit ``G`` (``N x d``) already in memory: the optimizer's route
    for models outside the fast route, whose closure gives the per-sample losses of one
    minibatch (``N = B``, so ``B x d`` is affordable where ``N x d`` of a dataset is not)."""

    def __init__(self, space: ParamSpace, rows: Tensor, losses: Tensor | None = None) -> None:
        if rows.dim() != 2 or rows.shape[1] != space.dim:
            raise ValueError(f"rows must be (N, {space.dim}), got {tuple(rows.shape)}")
        self.space, self.rows, self.n = space, rows, len(rows)
        self._losses = losses

    @classmethod
    def from_losses(
        cls, space: ParamSpace, params: Sequence[Tensor], losses: Tensor
    ) -> RowProducts:
        """Per-sample gradients of a ``(B,)`` loss vector with its autograd graph: one
        batched backward (``is_grads_batched``)."""
        if losses.dim() != 1:
            raise ValueError(
                f"the closure must return per-sample losses (B,), got shape {tuple(losses.shape)}"
            )
        eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, list(params), eye, is_grads_batched=True, allow_unused=True
        )
        rows = torch.cat(
            [
                (
                    g
                    if g is not None
                    else torch.zeros(
                        len(losses), p.numel(), dtype=losses.dtype, device=losses.device
                    )
                ).reshape(len(losses), -1)
                for g, p in zip(grads, params, strict=True)
            ],
            1,
        )
        return cls(space, rows, losses.detach())

    def jvp(self, v: Tensor) -> Tensor:
        return self.rows @ v

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.mv(self.rows.T, w, out=out) if out is not None else self.rows.T @ w

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        yield 0, self.rows

    def losses(self) -> Tensor:
        if self._losses is None:
            raise ValueError("these products were built without the losses")
        return self._losses

    def gram(self) -> Tensor:
        return self.rows @ self.rows.T


# --------------------------------------------------------------------------- fast route


def fast_route_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | str:
    """The ``(name, module)`` pairs of the fast route, or the reason it does not apply.

    The fast route needs every trainable parameter to be the ``weight`` or ``bias`` of an
    ``nn.Linear`` or of an ``nn.Conv2d`` with ``groups=1``, integer padding and zero padding
    mode.
    """
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.Conv2d):
            if (
                module.groups != 1
                or isinstance(module.padding, str)
                or module.padding_mode != "zeros"
            ):
                return f"Conv2d {name!r} has groups, string padding or a padding mode"
        elif not isinstance(module, nn.Linear):
            return f"{type(module).__name__} {name!r} is not Linear or Conv2d"
        layers.append((name, module))
    return layers


@dataclass
class LayerCapture:
    """A supported layer's inputs and output gradients for one chunk of samples.

    Linear: ``inputs (b, T, in)``, ``grads (b, T, out)`` (``T = 1`` for ordinary 2-D input).
    Conv2d: ``inputs (b, C_in, H, W)``, ``grads (b, C_out, H', W')``.
    ``grads`` are the gradients of the *per-sample* losses (not of their mean).
    """

    inputs: Tensor
    grads: Tensor


def _write(out: Tensor, value: Tensor, accumulate: bool) -> None:
    """``out += value`` or ``out = value``, in place."""
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)


class _Linear:
    """The per-layer formulas of a Linear layer."""

    @staticmethod
    def jvp(module: nn.Linear, cap: LayerCapture, v_w: Tensor, v_b: Tensor | None) -> Tensor:
        if cap.inputs.shape[1] == 1:  # plain (b, in) input: 2-D matmuls are fastest
            out = ((cap.inputs[:, 0] @ v_w.T) * cap.grads[:, 0]).sum(1)
        else:
            out = torch.einsum("nto,nto->n", cap.inputs @ v_w.T, cap.grads)
        return out + cap.grads.sum(1) @ v_b if v_b is not None else out

    @staticmethod
    def vjp(
        module: nn.Linear,
        cap: LayerCapture,
        w: Tensor,
        out_w: Tensor,
        out_b: Tensor | None,
        accumulate: bool,
    ) -> None:
        """``out_w (+)= Σ_i w_i Σ_t δ_it a_itᵀ`` and ``out_b (+)= Σ_i w_i Σ_t δ_it``."""
        weighted = cap.grads * w[:, None, None]
        deltas, inputs = weighted.flatten(0, 1).T, cap.inputs.flatten(0, 1)
        if accumulate:
            out_w.addmm_(deltas, inputs)
        else:
            torch.mm(deltas, inputs, out=out_w)
        if out_b is not None:
            _write(out_b, weighted.sum((0, 1)), accumulate)

    @staticmethod
    def per_sample(module: nn.Linear, cap: LayerCapture) -> tuple[Tensor, Tensor]:
        g_w = torch.einsum("nto,nti->noi", cap.grads, cap.inputs)
        return g_w.flatten(1), cap.grads.sum(1)

    @staticmethod
    def gram(cap_i: LayerCapture, cap_j: LayerCapture, bias: bool) -> Tensor | None:
        if cap_i.inputs.shape[1] != 1:
            return None  # sequence input: no cheap formula, materialise instead
        delta = cap_i.grads[:, 0] @ cap_j.grads[:, 0].T
        act = cap_i.inputs[:, 0] @ cap_j.inputs[:, 0].T
        return delta * (act + 1) if bias else delta * act

    @staticmethod
    def sq_norms(cap: LayerCapture) -> tuple[Tensor, Tensor] | None:
        if cap.inputs.shape[1] != 1:
            return None
        delta = cap.grads[:, 0].square().sum(1)
        return delta * cap.inputs[:, 0].square().sum(1), delta


class _Conv2d:
    """The per-layer formulas of a Conv2d layer (groups = 1)."""

    @staticmethod
    def jvp(module: nn.Conv2d, cap: LayerCapture, v_w: Tensor, v_b: Tensor | None) -> Tensor:
        response = F.conv2d(cap.inputs, v_w, None, module.stride, module.padding, module.dilation)
        out = (response * cap.grads).sum((1, 2, 3))
        return out + cap.grads.sum((2, 3)) @ v_b if v_b is not None else out

    @staticmethod
    def vjp(
        module: nn.Conv2d,
        cap: LayerCapture,
        w: Tensor,
        out_w: Tensor,
        out_b: Tensor | None,
        accumulate: bool,
    ) -> None:
        weighted = cap.grads * w[:, None, None, None]
        g_w = torch.nn.grad.conv2d_weight(
            cap.inputs,
            module.weight.shape,
            weighted,
            module.stride,
            module.padding,
            module.dilation,
        )
        _write(out_w, g_w, accumulate)
        if out_b is not None:
            _write(out_b, weighted.sum((0, 2, 3)), accumulate)

    @staticmethod
    def per_sample(module: nn.Conv2d, cap: LayerCapture) -> tuple[Tensor, Tensor]:
        patches = F.unfold(
            cap.inputs, module.kernel_size, module.dilation, module.padding, module.stride
        )
        grads = cap.grads.flatten(2)
        g_w = torch.einsum("nop,nkp->nok", grads, patches)
        return g_w.flatten(1), grads.sum(2)

    @staticmethod
    def gram(cap_i: LayerCapture, cap_j: LayerCapture, bias: bool) -> None:
        return None

    @staticmethod
    def sq_norms(cap: LayerCapture) -> None:
        return None


def _formulas(module: nn.Module) -> type[_Linear] | type[_Conv2d]:
    return _Conv2d if isinstance(module, nn.Conv2d) else _Linear


def capture_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    loss: PerSampleLoss,
    x: Tensor,
    y: Tensor,
) -> tuple[list[LayerCapture], Tensor]:
    """One forward and one backward pass recording each layer's inputs and the gradients of
    the per-sample losses at its outputs. Returns the captures and the losses ``(b,)``."""
    outputs: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module in outputs:
            raise UnsupportedModelError(
                "a layer is called more than once per forward pass (shared weights); use "
                "route='generic'"
            )
        outputs[module] = (inputs[0].detach(), output)

    handles = [module.register_forward_hook(hook) for _, module in layers]
    try:
        with torch.enable_grad():
            losses = loss(model(x), y)
            missing = [name for name, module in layers if module not in outputs]
            if missing:
                raise UnsupportedModelError(f"layers {missing} were not called in forward")
            tensors = [outputs[module][1] for _, module in layers]
            grads = torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    captures = []
    for (_, module), out, g in zip(layers, tensors, grads, strict=True):
        a = outputs[module][0]
        g = torch.zeros_like(out) if g is None else g.detach()
        if isinstance(module, nn.Linear):
            a, g = a.reshape(len(a), -1, a.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
        captures.append(LayerCapture(a, g))
    return captures, losses.detach()


class LayerProducts(PerSampleProducts):
    """The fast route for models of Linear and Conv2d layers (DESIGN §1).

    Products are contractions of cached layer inputs ``A`` and output gradients ``Δ``:
    ``G v`` costs one forward-sized matmul per layer and ``Gᵀ w`` one weight-gradient-sized
    matmul, with no further pass over the model. The raw Gram matrix of Linear layers is
    ``Σ_layers (A Aᵀ + 1) ⊙ (Δ Δᵀ)``; Conv2d layers materialise their per-sample gradients
    chunk by chunk.

    Build it with :meth:`from_model` (runs the captures) or :meth:`from_captures` (reuses the
    inputs and output gradients of a training step, as the optimizers do).
    """

    def __init__(
        self,
        space: ParamSpace,
        layers: Sequence[tuple[str, nn.Module]],
        chunks: Callable[[], Iterator[tuple[int, list[LayerCapture], Tensor]]],
        n: int,
    ) -> None:
        self.space = space
        self.layers = list(layers)
        self.n = n
        self._chunks = chunks
        self._param_of = []  # per layer: (weight slice, bias slice or None)
        for name, module in self.layers:
            prefix = f"{name}." if name else ""
            w = space.slice(prefix + "weight")
            b = space.slice(prefix + "bias") if module.bias is not None else None
            self._param_of.append((w, b))

    @classmethod
    def from_captures(
        cls,
        space: ParamSpace,
        layers: Sequence[tuple[str, nn.Module]],
        captures: list[LayerCapture],
        losses: Tensor | None = None,
    ) -> LayerProducts:
        """Products over one chunk whose captures are already at hand (``losses`` optional)."""
        n = len(captures[0].inputs)
        return cls(space, layers, lambda: iter([(0, captures, losses)]), n)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        loss_fn: LossSpec,
        data: DataSource,
        *,
        cache: bool | str = "auto",
        cache_limit: int = 2**31,
        progress: bool = False,
    ) -> LayerProducts:
        """Capture the layers over ``data``; cache the captures when they fit in
        ``cache_limit`` bytes (``cache="auto"``), else stream them on every product."""
        layers = fast_route_layers(model)
        if isinstance(layers, str):
            raise UnsupportedModelError(f"the fast route does not apply: {layers}")
        space = ParamSpace(model)
        loss = per_sample_loss(loss_fn)

        def stream(show: bool = progress) -> Iterator[tuple[int, list[LayerCapture], Tensor]]:
            for start, x, y in data.chunks(show, "capture"):
                captures, losses = capture_layers(model, layers, loss, x, y)
                yield start, captures, losses

        if cache is False:
            return cls(space, layers, stream, data.n)
        chunks = stream()
        first = next(chunks)
        per_sample = sum(c.inputs[0].numel() + c.grads[0].numel() for c in first[1])
        if (
            cache == "auto"
            and per_sample * data.n * first[1][0].inputs.element_size() > cache_limit
        ):  # the captures would not fit: stream them on every product
            chunks.close()
            return cls(space, layers, stream, data.n)
        cached = [first, *chunks]
        return cls(space, layers, lambda: iter(cached), data.n)

    def _params(self, v: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        module = self.layers[k][1]
        w, b = self._param_of[k]
        return v[w].view(module.weight.shape), (v[b] if b is not None else None)

    def jvp(self, v: Tensor) -> Tensor:
        out = torch.zeros(self.n, dtype=v.dtype, device=v.device)
        for start, captures, _ in self._chunks():
            c = sum(
                _formulas(module).jvp(module, cap, *self._params(v, k))
                for k, ((_, module), cap) in enumerate(zip(self.layers, captures, strict=True))
            )
            out[start : start + len(captures[0].inputs)] = c
        return out

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """Each layer's part is written in place into its slice of the result (every
        parameter belongs to one layer), the first chunk's directly, later chunks' added."""
        total = (
            out if out is not None else torch.empty(self.space.dim, dtype=w.dtype, device=w.device)
        )
        for chunk, (start, captures, _) in enumerate(self._chunks()):
            wc = w[start : start + len(captures[0].inputs)]
            for (_, module), cap, (sw, sb) in zip(
                self.layers, captures, self._param_of, strict=True
            ):
                _formulas(module).vjp(
                    module,
                    cap,
                    wc,
                    total[sw].view(module.weight.shape),
                    total[sb] if sb is not None else None,
                    accumulate=chunk > 0,
                )
        return total

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        for start, captures, _ in self._chunks():
            rows = torch.zeros(
                len(captures[0].inputs),
                self.space.dim,
                dtype=self.space.dtype,
                device=captures[0].inputs.device,
            )
            for (_, module), cap, (sw, sb) in zip(
                self.layers, captures, self._param_of, strict=True
            ):
                g_w, g_b = _formulas(module).per_sample(module, cap)
                rows[:, sw] = g_w
                if sb is not None:
                    rows[:, sb] = g_b
            yield start, rows

    def losses(self) -> Tensor:
        chunks = [losses for _, _, losses in self._chunks()]
        if any(c is None for c in chunks):
            raise ValueError("these products were built from captures without the losses")
        return torch.cat(chunks)

    def gram(self) -> Tensor:
        out = torch.zeros(self.n, self.n, dtype=self.space.dtype, device=self.space.device)
        for i, caps_i, _ in self._chunks():
            for j, caps_j, _ in self._chunks():
                if j < i:
                    continue
                block = torch.zeros(
                    len(caps_i[0].inputs), len(caps_j[0].inputs), dtype=out.dtype, device=out.device
                )
                for k, (_, module) in enumerate(self.layers):
                    part = _formulas(module).gram(caps_i[k], caps_j[k], module.bias is not None)
                    if part is None:  # no cheap formula: materialise this layer's rows
                        part = self._materialised_gram(k, caps_i[k], caps_j[k])
                    block += part
                out[i : i + len(block), j : j + block.shape[1]] = block
                out[j : j + block.shape[1], i : i + len(block)] = block.T
        return out

    def _materialised_gram(self, k: int, cap_i: LayerCapture, cap_j: LayerCapture) -> Tensor:
        module = self.layers[k][1]
        rows_i = torch.cat(_formulas(module).per_sample(module, cap_i), 1)
        rows_j = torch.cat(_formulas(module).per_sample(module, cap_j), 1)
        if module.bias is None:  # per_sample returns the bias sum anyway; drop it
            rows_i, rows_j = rows_i[:, : module.weight.numel()], rows_j[:, : module.weight.numel()]
        return rows_i @ rows_j.T

    def sq_norms(self) -> Tensor:
        out = torch.zeros(
            self.n, len(self.space.names), dtype=self.space.dtype, device=self.space.device
        )
        column = {n: p for p, n in enumerate(self.space.names)}
        for start, captures, _ in self._chunks():
            stop = start + len(captures[0].inputs)
            for (name, module), cap in zip(self.layers, captures, strict=True):
                norms = _formulas(module).sq_norms(cap)
                if norms is None:
                    g_w, g_b = _formulas(module).per_sample(module, cap)
                    norms = g_w.square().sum(1), g_b.square().sum(1)
                prefix = f"{name}." if name else ""
                out[start:stop, column[prefix + "weight"]] = norms[0]
                if module.bias is not None:
                    out[start:stop, column[prefix + "bias"]] = norms[1]
        return out


def make_products(
    model: nn.Module,
    loss_fn: LossSpec,
    data: DataSource,
    *,
    route: str = "auto",
    cache: bool | str = "auto",
    progress: bool = False,
) -> PerSampleProducts:
    """The fast route when every parametrised module supports it (``route="auto"``), else
    the generic one. ``route="fast"`` raises if the fast route does not apply."""
    if route not in ("auto", "fast", "generic"):
        raise ValueError(f"route must be 'auto', 'fast' or 'generic', got {route!r}")
    check_independent_samples(model)
    if route == "generic" or (route == "auto" and isinstance(fast_route_layers(model), str)):
        return FuncProducts(model, loss_fn, data, progress=progress)
    try:
        return LayerProducts.from_model(model, loss_fn, data, cache=cache, progress=progress)
    except UnsupportedModelError:
        if route == "fast":
            raise
        return FuncProducts(model, loss_fn, data, progress=progress)
