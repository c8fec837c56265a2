r"""The capture route: per-sample products from one ordinary forward and backward pass.

A *plan* (:func:`plan_layers`) gives every trainable parameter one owner module and that
module's rule (:mod:`sgdgeom.persample.layers`). One forward with hooks records what each
owner saw, one backward of :math:`\sum_i f_i` gives the gradients of the *per-sample*
losses at its outputs (samples are independent, so row i of the output gradient is
:math:`\partial f_i / \partial z_i`), and the rules turn them into ``G v``, ``Gᵀ w``, the
Gram matrix and rows of G (``docs/design.md``), with no further pass over the model.

**Rows where they are cheaper.** Where a layer's per-sample gradients over a chunk fit in
:data:`ROWS_LIMIT` and take no more memory than what its calls keep (a convolution or a norm
layer on large feature maps: ``b x`` the layer's parameters against ``b x`` its
activations), or where its Gram matrix would materialise them anyway (a Linear on long
sequences), the capture forms them once (:class:`RowsCall`) and drops the calls: every
product is then a matrix product with them. A rule that
:attr:`~sgdgeom.persample.layers.LayerRule.prefer_rows` (the fallback) forms them whenever
they fit.

**Coverage check** (before the first product). The rules are exact only if each parameter
is used inside its owner's forward: a weight also used elsewhere (tied weights,
``F.linear(h, enc.weight.t())``) would lose that use without a word. So
:func:`check_coverage` compares, per parameter, the sum of the rules' per-sample gradients
with autograd's batch gradient on a few samples; a mismatch raises
:class:`CoverageError` naming the parameter. A module called several times is exact (its
rule sums over the calls). The check runs once per model, plan, loss and input shape: a
model that passed it is not checked again (its parameters may change, its structure not).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.params import ParamSpace
from sgdgeom.persample.base import PerSampleProducts
from sgdgeom.persample.internal import internal_passes
from sgdgeom.persample.layers import LayerRule, rule_for
from sgdgeom.persample.layers.registry import write
from sgdgeom.persample.losses import LossSpec, PerSampleLoss, per_sample_loss
from sgdgeom.persample.source import DataSource
from sgdgeom.persample.storage import (
    CacheMode,
    DiskChunks,
    available_bytes,
    cache_mode,
    check_disk,
    nbytes,
)
from sgdgeom.precision import capture_dtype, compute_dtype, full_precision, upcast

__all__ = [
    "UNCOVERED_CAUSES",
    "CaptureProducts",
    "Chunk",
    "CoverageError",
    "Layer",
    "RowsCall",
    "capture_chunk",
    "check_coverage",
    "compact_calls",
    "coverage_failures",
    "describe",
    "gram_failures",
    "uncovered",
    "plan_layers",
    "repeat_batchless",
]

UNCOVERED_CAUSES = (
    "the parameter is also used outside the forward of the modules that own it (a weight "
    "applied by a function, F.linear(h, enc.weight.t())?), its module mixes the samples of "
    "a batch or takes another axis than dim 0 for them (sequence-first?), or its module's "
    "input has no batch dimension but a first dimension of the batch's size (position ids "
    "torch.arange(T) with T = B: pass torch.arange(T)[None], of shape (1, T))"
)
COVERAGE_SAMPLES = 8  # samples of the first chunk that the coverage check uses
ROWS_LIMIT = 2**28  # bytes of per-sample rows a layer may keep per chunk (256 MiB)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> what passed


class CoverageError(UnsupportedModelError):
    """A parameter is not used once per sample inside its owner module's forward."""


@dataclass
class Layer:
    """An owner module of the plan: its rule, the local names of its trainable parameters,
    their places in the flat vector and their shapes. A parameter that the module shares
    with an earlier one (a language model's head tied to its token embedding) has that
    one's place: its name in the parameter space is :meth:`space_name`."""

    name: str
    module: nn.Module
    rule: LayerRule
    names: list[str]
    slices: dict[str, slice]
    shapes: dict[str, torch.Size]
    #: local names of the parameters first owned by another layer -> their space names
    shared: dict[str, str] = field(default_factory=dict)

    def qualified(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def space_name(self, local: str) -> str:
        """The parameter's name in the parameter space (its first owner's)."""
        return self.shared.get(local) or self.qualified(local)

    def weights(self) -> list[tuple[str, nn.Parameter]]:
        """The layer's weights in Musso's sense (M2): its trainable parameters that are not
        biases and have at least 2 dimensions (matrices, kernels), by qualified name."""
        named = dict(self.module.named_parameters(recurse=self.rule.recursive))
        return [
            (self.qualified(n), named[n])
            for n in self.names
            if not ParamSpace.is_bias(n) and named[n].dim() >= 2
        ]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """The layer's parameters' parts of a flat ``(d,)`` vector, shaped like them."""
        return {n: flat[self.slices[n]].view(self.shapes[n]) for n in self.names}

    def block_views(self, block: Tensor) -> dict[str, Tensor]:
        """The layer's parameters' parts of ``m`` flat vectors ``(d, m)``: ``(m, *shape)``."""
        return {n: block[self.slices[n]].T.reshape(-1, *self.shapes[n]) for n in self.names}


@dataclass
class RowsCall:
    """A layer's per-sample gradients over one chunk, summed over its calls: ``(b, numel)``
    for each trainable parameter (local names)."""

    rows: dict[str, Tensor]


def compact_calls(layer: Layer, calls: list[Any], size: int) -> list[Any]:
    """The calls, or one :class:`RowsCall` where the rows are the cheaper thing to keep:
    within :data:`ROWS_LIMIT`, when the rule prefers rows, when they are smaller than the
    calls, or when the rule would materialise them for the Gram matrix anyway (it has no
    ghost formula for these calls): then every later product reuses them. Rows are formed
    in the compute dtype (float32 from bfloat16 captures)."""
    if not calls:
        return calls
    numel = sum(layer.shapes[n].numel() for n in layer.names)
    dtype = compute_dtype(next(iter(layer.module.parameters())).dtype)  # the rows'
    itemsize = dtype.itemsize
    if size * numel * itemsize > ROWS_LIMIT:
        return calls
    materialised = len(calls) > 1 or not layer.rule.has_ghost_gram(layer.module, calls[0])
    smaller = size * numel * itemsize <= nbytes(calls)
    if not (layer.rule.prefer_rows or materialised or smaller):
        return calls
    rows: dict[str, Tensor] = {}
    for call in upcast(calls, dtype):
        for name, part in layer.rule.per_sample(layer.module, call, layer.names).items():
            part = part.reshape(size, -1)
            rows[name] = rows[name] + part if name in rows else part
    return [RowsCall(rows)]


@dataclass
class Chunk:
    """The calls of every layer (in plan order) over one chunk of samples."""

    start: int
    size: int
    calls: list[list[Any]]
    losses: Tensor | None


def plan_layers(
    model: nn.Module, space: ParamSpace | None = None, *, allow_shared: bool = False
) -> list[Layer]:
    """The owner modules of the trainable parameters, each with its rule: the registry's one
    definition of a model's layers.

    Walking the modules from the root, a module that owns parameters directly gets
    :func:`~sgdgeom.persample.layers.rule_for` its type; a recursive rule (the fallback) owns
    its children's parameters too. A parameter tensor shared between modules (a head tied
    to the token embedding) belongs to each of them: its per-sample gradient is the sum of
    their contributions, which :class:`CaptureProducts` adds up (``Layer.shared``). With
    ``allow_shared``, its first owner alone keeps it: what naming the layers needs.
    """
    space = space or ParamSpace(model)
    trainable = set(space.names)
    owner_of: dict[int, str] = {}
    layers: list[Layer] = []

    def visit(prefix: str, module: nn.Module) -> None:
        own = list(module.named_parameters(recurse=False))
        if own:
            rule = rule_for(module)
            local = list(module.named_parameters(recurse=rule.recursive, remove_duplicate=False))
            names: list[str] = []
            slices: dict[str, slice] = {}
            shapes: dict[str, torch.Size] = {}
            shared: dict[str, str] = {}
            for name, param in local:
                qualified = f"{prefix}.{name}" if prefix else name
                first = owner_of.setdefault(id(param), qualified)
                within = first in (f"{prefix}.{n}" if prefix else n for n in names)
                if first != qualified and (allow_shared or within or first not in trainable):
                    continue  # named once; a module's own reuse is inside its forward
                if first != qualified:
                    shared[name] = first
                if param.requires_grad and first in trainable:
                    names.append(name)
                    slices[name], shapes[name] = space.slice(first), param.shape
            if names:
                layers.append(Layer(prefix, module, rule, names, slices, shapes, shared))
            if rule.recursive:
                return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    owned = {layer.space_name(n) for layer in layers for n in layer.names}
    missing = [n for n in space.names if n not in owned]
    if missing:
        raise CoverageError(f"parameters {missing} belong to no module of the model")
    return layers


class _Repeat(torch.autograd.Function):
    """A batchless output ``(*shape)`` or ``(1, *shape)`` repeated for each of ``size``
    samples, ``(size, *shape)``; the backward sums the per-sample gradients that reach it
    (the capture has kept them first)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, size: int) -> Tensor:
        ctx.single = output.dim() > 0 and output.shape[0] == 1
        base = output[0] if ctx.single else output
        return base.unsqueeze(0).expand(size, *base.shape).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.sum(0)
        return (total.unsqueeze(0) if ctx.single else total), None


def _positions(saved: Tensor, size: int) -> bool:
    """Whether an input without the batch's size in front is shared by every sample: its
    length is not a multiple of the batch size (so it is no flattened batch, ``(B T, F)``),
    and the batch's size is on none of its axes (no sequence-first layer); or it is the
    position ids ``torch.arange(L)`` themselves (read, one host read, only where L is a
    multiple of the batch size, as a flattened batch of token ids would be)."""
    length = saved.shape[0] if saved.dim() else 1
    if size in saved.shape:
        return False
    if length % size:
        return True
    return (
        saved.dim() == 1
        and not saved.is_floating_point()
        and torch.equal(saved, torch.arange(length, device=saved.device, dtype=saved.dtype))
    )


def repeat_batchless(saved: Any, output: Any, size: int) -> tuple[Tensor, Tensor] | None:
    """For a module called on an input without the batch dimension (a position embedding
    of ``torch.arange(T)``, shared by every sample): its saved input and its output
    repeated for each of the batch's ``size`` samples, so that each sample's output
    gradient reaches the capture and the rule sees an ordinary batch. None where the output
    has the batch dimension, where the input may hold the batch another way (an axis of the
    batch's size: sequence-first; a length that is a multiple of it: a flattened batch; the
    coverage check refuses such layers, the model's forward is left as it is), or where the
    call keeps more than one tensor.

    The batch dimension is told by its size: an input whose first dimension happens to equal
    the batch size (``torch.arange(T)`` with ``T = B``) reads as batched, and the coverage
    check refuses it (:func:`check_coverage` names the cause)."""
    if not (isinstance(output, Tensor) and isinstance(saved, Tensor)) or size < 2:
        return None
    if output.dim() > 0 and output.shape[0] == size:
        return None
    single = saved.dim() > 0 and saved.shape[0] == 1  # (1, T): broadcast over the batch
    if not single and not _positions(saved, size):
        return None
    base = saved[0] if single else saved
    return base.unsqueeze(0).expand(size, *base.shape), _Repeat.apply(output, size)


def capture_chunk(
    model: nn.Module,
    layers: Sequence[Layer],
    loss: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    params: Sequence[Tensor] = (),
    copy_outputs: bool = False,
    param_weights: Tensor | None = None,
    compact: bool = True,
) -> tuple[list[list[Any]], Tensor, list[Tensor | None]]:
    """One forward recording every layer's calls, one backward of ``Σ_i f_i`` to their
    outputs and, for the coverage check, one of ``Σ_i r_i f_i`` to ``params`` (``r`` =
    ``param_weights``). Returns the calls per layer, the per-sample losses ``(b,)`` and the
    gradients of ``params``. ``compact=False`` keeps every layer's merged calls as its rule
    made them (no :func:`compact_calls`): what a test of the rules needs.

    A layer output that the forward later changes in place (``ReLU(inplace=True)``) would
    give the gradient of the changed tensor: that is detected by its version counter, and
    the chunk is captured again with ``copy_outputs`` (the layers hand on copies)."""
    records: list[list[tuple[Any, tuple[Tensor, ...]]]] = [[] for _ in layers]
    versions: list[tuple[Tensor, int]] = []

    def hook(k: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        rule = layers[k].rule
        saved = rule.record(module, args, kwargs, output)
        repeated = repeat_batchless(saved, output, len(x))
        if repeated is not None:
            saved, output = repeated
        outputs = rule.outputs(output)
        records[k].append((saved, outputs))
        versions.extend((t, t._version) for t in outputs)
        if copy_outputs:
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, output)
        return output if repeated is not None else None

    handles = [
        layer.module.register_forward_hook(functools.partial(hook, k), with_kwargs=True)
        for k, layer in enumerate(layers)
    ]
    try:
        with torch.enable_grad(), internal_passes():
            losses = loss(model(x), y)
            total = losses.sum()
            weighted = (param_weights * losses).sum() if param_weights is not None else total
    finally:
        for handle in handles:
            handle.remove()
    if not copy_outputs and any(t._version != version for t, version in versions):
        return capture_chunk(model, layers, loss, x, y, params, True, param_weights, compact)
    outputs = [t for record in records for _, outs in record for t in outs if t.requires_grad]
    grads = (
        list(torch.autograd.grad(total, outputs, retain_graph=bool(params), allow_unused=True))
        if outputs
        else []
    )
    if params:
        grads += torch.autograd.grad(weighted, list(params), allow_unused=True)
    found = {id(t): g for t, g in zip(outputs, grads, strict=False)}
    calls = []
    for layer, record in zip(layers, records, strict=True):
        layer_calls = [
            layer.rule.call(
                layer.module,
                saved,
                tuple(
                    g.detach() if (g := found.get(id(t))) is not None else torch.zeros_like(t)
                    for t in outs
                ),
            )
            for saved, outs in record
        ]
        merged = layer.rule.merge(layer.module, layer_calls) if layer_calls else []
        calls.append(compact_calls(layer, merged, len(x)) if compact else merged)
    return calls, losses.detach(), list(grads[len(outputs) :])


class CaptureProducts(PerSampleProducts):
    """Products from captured layer inputs and output gradients (``docs/design.md``).

    ``G v`` costs one forward-sized product per layer and ``Gᵀ w`` one weight-gradient-sized
    product, with no further pass over the model. The raw Gram matrix uses each rule's ghost
    formula where it has one (Linear: ``(A Aᵀ + 1) ⊙ (Δ Δᵀ)``) and materialises that layer's
    rows chunk by chunk elsewhere.

    Build it with :meth:`from_model` (runs the captures and the coverage check) or
    :meth:`from_calls` (reuses the calls of a training step, as the optimizer does).
    ``scale`` multiplies the captured gradients: a training loop's output gradients are
    those of the mean loss, ``1/N`` of the per-sample ones, so it passes ``scale = N``.
    """

    def __init__(
        self,
        space: ParamSpace,
        layers: Sequence[Layer],
        chunks: Callable[[], Iterator[Chunk]],
        n: int,
        scale: float = 1.0,
        storage: str = "memory",
    ) -> None:
        self.space = space
        self.layers = list(layers)
        self.n = n
        self.scale = scale
        self.storage = storage
        self._source = chunks
        #: memory-mapped captures that live as long as the products
        self.disk: DiskChunks | None = None
        #: the layers in groups that share parameters (singletons where nothing is shared)
        self.units = _units(self.layers)
        self._tied = {k for unit in self.units if len(unit) > 1 for k in unit}

    @classmethod
    def from_calls(
        cls,
        space: ParamSpace,
        layers: Sequence[Layer],
        calls: list[list[Any]],
        size: int,
        losses: Tensor | None = None,
        scale: float = 1.0,
    ) -> CaptureProducts:
        """Products over one chunk of ``size`` samples whose calls are at hand."""
        return cls.from_chunks(space, layers, [Chunk(0, size, calls, losses)], scale)

    @classmethod
    def from_chunks(
        cls, space: ParamSpace, layers: Sequence[Layer], chunks: list[Chunk], scale: float = 1.0
    ) -> CaptureProducts:
        """Products over chunks at hand (consecutive, from sample 0)."""
        n = sum(chunk.size for chunk in chunks)
        return cls(space, layers, lambda: iter(chunks), n, scale)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        loss_fn: LossSpec,
        data: DataSource,
        *,
        cache: CacheMode = "auto",
        cache_limit: int = 2**31,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> CaptureProducts:
        """Plan and check the layers, then capture them over ``data``.

        Where the captures live (:attr:`storage`): ``cache="memory"`` keeps them in memory;
        ``"auto"`` keeps them in memory when they fit in ``cache_limit`` bytes and half the
        free memory, else in memory-mapped files under ``cache_dir`` if one is given
        (:class:`~sgdgeom.persample.storage.DiskChunks`; the free disk is checked first),
        else captures again on every product, with a warning that says how much they would
        take; ``"disk"`` always writes them under ``cache_dir``; ``"off"`` never keeps them.
        Raises :class:`CoverageError` if a parameter is used outside its module."""
        cache = cache_mode(cache)
        if cache == "disk" and cache_dir is None:
            raise InputError("cache='disk' needs a cache_dir for the memory-mapped captures")
        space = ParamSpace(model)
        layers = plan_layers(model, space)
        loss = per_sample_loss(loss_fn)

        def stream(show: bool = progress) -> Generator[Chunk, None, None]:
            for start, x, y in data.chunks(show, "capture"):
                calls, losses, _ = capture_chunk(model, layers, loss, x, y)
                yield Chunk(start, len(x), calls, losses)

        _, x, y = next(data.chunks())
        key = (
            tuple((id(layer.module), tuple(layer.names)) for layer in layers),
            loss_fn if isinstance(loss_fn, str) else id(loss_fn),
            tuple(x.shape[1:]),
            x.dtype,
        )
        if _CHECKED.get(model) != key:
            try:
                check_coverage(
                    model, layers, space, loss, x[:COVERAGE_SAMPLES], y[:COVERAGE_SAMPLES]
                )
            except RuntimeError as err:
                raise CoverageError(
                    f"a layer's calls do not hold the samples along dim 0 ({err}): a "
                    f"sequence-first layer, or the batch flattened into its first axis? use "
                    f"route='generic', which is exact for any model"
                ) from err
            _CHECKED[model] = key
        if cache == "off":
            return cls(space, layers, stream, data.n, storage="stream")
        chunks = stream()
        first = next(chunks)
        estimate = int(nbytes(first) * data.n / first.size)
        free = available_bytes(space.device)
        fits = estimate <= cache_limit and (free is None or 2 * estimate <= free)
        if cache == "memory" or (cache == "auto" and fits):
            cached = [first, *chunks]
            return cls(space, layers, lambda: iter(cached), data.n, storage="memory")
        if cache_dir is not None:  # "disk", or "auto" where memory is too small
            check_disk(Path(cache_dir), estimate)
            disk = DiskChunks(cache_dir)
            for chunk in (first, *chunks):
                disk.add(chunk)
            products = cls(space, layers, lambda: iter(disk), data.n, storage="disk")
            products.disk = disk  # the files live as long as the products
            return products
        chunks.close()  # the captures would not fit: capture again on every pass
        warnings.warn(
            f"the captures of {data.n:,} samples would take about {estimate / 2**30:.1f} GiB, "
            f"more than the memory allows: every product runs the model again; pass "
            f"cache_dir to keep them in memory-mapped files instead",
            stacklevel=3,
        )
        return cls(space, layers, stream, data.n, storage="stream")

    def _chunks(self) -> Iterator[Chunk]:
        """The chunks, their calls in the space's dtype: captures of lower precision
        (autocast's) are converted one chunk at a time, just before a product."""
        for chunk in self._source():
            calls = upcast(chunk.calls, self.space.dtype)
            yield chunk if calls is chunk.calls else replace(chunk, calls=calls)

    # ------------------------------------------------------------------ one call

    @staticmethod
    def _call_jvp(layer: Layer, call: Any, view: dict[str, Tensor]) -> Tensor:
        if isinstance(call, RowsCall):
            return torch.stack([call.rows[n] @ view[n].reshape(-1) for n in layer.names]).sum(0)
        return layer.rule.jvp(layer.module, call, view)

    @staticmethod
    def _call_vjp(
        layer: Layer, call: Any, w: Tensor, out: dict[str, Tensor], accumulate: bool
    ) -> None:
        if isinstance(call, RowsCall):
            for name, target in out.items():
                write(target, (w @ call.rows[name]).view(target.shape), accumulate)
        else:
            layer.rule.vjp(layer.module, call, w, out, accumulate)

    @staticmethod
    def _call_rows(layer: Layer, call: Any) -> dict[str, Tensor]:
        if isinstance(call, RowsCall):
            return call.rows
        return layer.rule.per_sample(layer.module, call, layer.names)

    @staticmethod
    def _call_gram(layer: Layer, call_i: Any, call_j: Any) -> Tensor | None:
        """``g_i · g_j`` over the layer between two calls, or ``None`` (materialise)."""
        rows_i, rows_j = isinstance(call_i, RowsCall), isinstance(call_j, RowsCall)
        if rows_i and rows_j:
            return sum(call_i.rows[n] @ call_j.rows[n].T for n in layer.names)
        if rows_i or rows_j:
            return None
        return layer.rule.gram(layer.module, call_i, call_j, layer.names)

    # ------------------------------------------------------------------ products

    def jvp(self, v: Tensor) -> Tensor:
        out = torch.zeros(self.n, dtype=v.dtype, device=v.device)
        views = [layer.views(v) for layer in self.layers]
        for chunk in self._chunks():
            part = out[chunk.start : chunk.start + chunk.size]
            for layer, calls, view in zip(self.layers, chunk.calls, views, strict=True):
                for call in calls:
                    part += self._call_jvp(layer, call, view)
        return out.mul_(self.scale) if self.scale != 1 else out

    def jvp_batch(self, V: Tensor) -> Tensor:
        """``G V`` for ``(d, m)``: each layer's rule takes the ``m`` vectors at once (one
        forward-sized matmul per call), in one pass over the captures."""
        out = torch.zeros(self.n, V.shape[1], dtype=V.dtype, device=V.device)
        views = [layer.block_views(V) for layer in self.layers]
        for chunk in self._chunks():
            part = out[chunk.start : chunk.start + chunk.size]
            for layer, calls, view in zip(self.layers, chunk.calls, views, strict=True):
                for call in calls:
                    if isinstance(call, RowsCall):
                        part += sum(call.rows[n] @ view[n].flatten(1).T for n in layer.names)
                    else:
                        part += layer.rule.jvp_batch(layer.module, call, view)
        return out.mul_(self.scale) if self.scale != 1 else out

    def vjp_batch(self, W: Tensor) -> Tensor:
        """``Gᵀ W`` for ``(N, m)``: one weight-gradient-sized matmul per call for all ``m``
        columns, in one pass over the captures."""
        total = torch.zeros(self.space.dim, W.shape[1], dtype=W.dtype, device=W.device)
        for chunk in self._chunks():
            wc = W[chunk.start : chunk.start + chunk.size]
            wc = wc * self.scale if self.scale != 1 else wc
            for layer, calls in zip(self.layers, chunk.calls, strict=True):
                for call in calls:
                    if isinstance(call, RowsCall):
                        parts = {n: wc.T @ call.rows[n] for n in layer.names}
                    else:
                        parts = layer.rule.vjp_batch(layer.module, call, wc, layer.names)
                    for name, part in parts.items():
                        total[layer.slices[name]] += part.reshape(len(part), -1).T
        return total

    def vjp(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """Each layer's part is written in place into its slice of the result, the first
        call's directly, later calls' and chunks' added."""
        total = (
            out if out is not None else torch.empty(self.space.dim, dtype=w.dtype, device=w.device)
        )
        views = [layer.views(total) for layer in self.layers]
        written = [k in self._tied for k in range(len(self.layers))]
        for k in self._tied:  # a shared parameter sums its layers' parts: start from zero
            for part in views[k].values():
                part.zero_()
        for chunk in self._chunks():
            wc = w[chunk.start : chunk.start + chunk.size]
            wc = wc * self.scale if self.scale != 1 else wc  # G = scale · G_captured
            for k, (layer, calls) in enumerate(zip(self.layers, chunk.calls, strict=True)):
                for call in calls:
                    self._call_vjp(layer, call, wc, views[k], accumulate=written[k])
                    written[k] = True
        for k, view in enumerate(views):
            if not written[k]:  # never called: zero per-sample gradients
                for part in view.values():
                    part.zero_()
        return total

    def _rows(self, layer: Layer, calls: list[Any], size: int) -> Tensor:
        """The layer's per-sample gradients over one chunk, ``(size, d_layer)``, summed over
        its calls, in its parameters' order."""
        total: Tensor | None = None
        for call in calls:
            named = self._call_rows(layer, call)
            parts = [named[n].reshape(size, -1) for n in layer.names]
            part = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            total = part if total is None else total + part
        if total is None:
            width = sum(self.layers_numel(layer))
            return torch.zeros(size, width, dtype=self.space.dtype, device=self.space.device)
        return total

    @staticmethod
    def layers_numel(layer: Layer) -> list[int]:
        return [layer.slices[n].stop - layer.slices[n].start for n in layer.names]

    def per_sample_grads(self) -> Iterator[tuple[int, Tensor]]:
        for chunk in self._chunks():
            rows = torch.zeros(
                chunk.size, self.space.dim, dtype=self.space.dtype, device=self.space.device
            )
            for layer, calls in zip(self.layers, chunk.calls, strict=True):
                part = self._rows(layer, calls, chunk.size)
                offset = 0
                for name, numel in zip(layer.names, self.layers_numel(layer), strict=True):
                    rows[:, layer.slices[name]] += part[:, offset : offset + numel]
                    offset += numel
            yield chunk.start, rows.mul_(self.scale) if self.scale != 1 else rows

    def losses(self) -> Tensor:
        chunks = [chunk.losses for chunk in self._chunks()]
        present = [c for c in chunks if c is not None]
        if len(present) != len(chunks):
            raise InputError("these products were built from captures without the losses")
        return torch.cat(present)

    def gram(self) -> Tensor:
        out = torch.zeros(self.n, self.n, dtype=self.space.dtype, device=self.space.device)
        for chunk_i in self._chunks():
            for chunk_j in self._chunks():
                if chunk_j.start < chunk_i.start:
                    continue
                block = self.gram_block(chunk_i, chunk_j)
                i, j = chunk_i.start, chunk_j.start
                out[i : i + chunk_i.size, j : j + chunk_j.size] = block
                out[j : j + chunk_j.size, i : i + chunk_i.size] = block.T
        return out

    def gram_block(self, chunk_i: Chunk, chunk_j: Chunk) -> Tensor:
        """``g_a · g_b`` for the samples a of one chunk and b of another (of these products
        or of another process's: :mod:`sgdgeom.persample.distributed`), ``(b_i, b_j)``."""
        block = torch.zeros(
            chunk_i.size, chunk_j.size, dtype=self.space.dtype, device=self.space.device
        )
        for unit in self.units:
            if len(unit) > 1:  # shared parameters: their rows, summed over the layers
                rows_i = self._named_rows(unit, chunk_i.calls, chunk_i.size)
                rows_j = self._named_rows(unit, chunk_j.calls, chunk_j.size)
                for name, rows in rows_i.items():
                    if name in rows_j:
                        block += rows @ rows_j[name].T
                continue
            layer = self.layers[unit[0]]
            calls_i, calls_j = chunk_i.calls[unit[0]], chunk_j.calls[unit[0]]
            if not calls_i or not calls_j:
                continue
            part = None
            if len(calls_i) == len(calls_j) == 1:
                part = self._call_gram(layer, calls_i[0], calls_j[0])
            if part is None:  # no ghost formula: materialise this layer's rows
                part = (
                    self._rows(layer, calls_i, chunk_i.size)
                    @ self._rows(layer, calls_j, chunk_j.size).T
                )
            block += part
        return block.mul_(self.scale**2) if self.scale != 1 else block

    def _named_rows(self, unit: list[int], calls: list[list[Any]], size: int) -> dict[str, Tensor]:
        """The per-sample gradients ``(size, numel)`` of a unit's parameters over one
        chunk, by name in the parameter space, each summed over the layers that use it."""
        rows: dict[str, Tensor] = {}
        for k in unit:
            layer = self.layers[k]
            for call in calls[k]:
                for local, part in self._call_rows(layer, call).items():
                    name, part = layer.space_name(local), part.reshape(size, -1)
                    rows[name] = rows[name] + part if name in rows else part
        return rows

    def costs(self) -> tuple[float, float]:
        """Summed over the chunks, layers and calls: each rule's
        :meth:`~sgdgeom.persample.layers.registry.LayerRule.costs` (a stored call's rows:
        ``b · numel`` and ``b² · numel``), the Gram matrix's cross-chunk blocks pro rata.
        It reads the calls of every chunk: cheap for captures at hand (the optimizer's), a
        pass over the data for streamed ones."""
        product = gram = 0.0
        for chunk in self._chunks():
            for layer, calls in zip(self.layers, chunk.calls, strict=True):
                numel = sum(self.layers_numel(layer))
                for call in calls:
                    cost: tuple[float, float]
                    if isinstance(call, RowsCall):
                        cost = (chunk.size * numel, chunk.size * chunk.size * numel)
                    else:
                        cost = layer.rule.costs(layer.module, call, chunk.size, numel)
                    product += cost[0]
                    gram += cost[1] * self.n / chunk.size  # its blocks with every chunk
        return product, gram

    def _squares(self, chunk: Chunk, over_samples: bool) -> Iterator[tuple[str, Tensor]]:
        """Each parameter's squared per-sample gradients over one chunk, by name in the
        parameter space: summed over its entries, ``(b,)``, or (``over_samples``) over the
        samples, shaped like it. A rule's formula where it has one (a Linear on
        non-sequence inputs: ``‖δ_i‖² ‖a_i‖²`` and ``(Δ ⊙ Δ)ᵀ (A ⊙ A)``), else the squares
        of the rows, parameter by parameter (each summed over the calls and the layers that
        use it), by one fused reduction (``vector_norm``: no squared copy of the rows)."""
        dim = 0 if over_samples else 1
        for unit in self.units:
            layer, calls = self.layers[unit[0]], chunk.calls[unit[0]]
            if len(unit) == 1 and len(calls) == 1 and not isinstance(calls[0], RowsCall):
                formula = layer.rule.square_sum if over_samples else layer.rule.sq_norms
                values = formula(layer.module, calls[0], layer.names)
                if values is not None:
                    for name, value in values.items():
                        yield layer.space_name(name), value
                    continue
            for name, rows in self._named_rows(unit, chunk.calls, chunk.size).items():
                yield name, torch.linalg.vector_norm(rows, dim=dim).square()

    def sq_norms(self) -> Tensor:
        out = torch.zeros(
            self.n, len(self.space.names), dtype=self.space.dtype, device=self.space.device
        )
        column = {n: p for p, n in enumerate(self.space.names)}
        for chunk in self._chunks():
            for name, value in self._squares(chunk, over_samples=False):
                out[chunk.start : chunk.start + chunk.size, column[name]] = value
        return out.mul_(self.scale**2) if self.scale != 1 else out

    def square_sum(self) -> Tensor:
        """``Σ_i g_i ⊙ g_i``, ``(d,)``, parameter by parameter (see :meth:`_squares`)."""
        out = torch.zeros(self.space.dim, dtype=self.space.dtype, device=self.space.device)
        for chunk in self._chunks():
            for name, value in self._squares(chunk, over_samples=True):
                out[self.space.slice(name)] += value.reshape(-1)
        return out.mul_(self.scale**2) if self.scale != 1 else out


def _units(layers: Sequence[Layer]) -> list[list[int]]:
    """The layers' indices in groups that share parameters (connected through shared
    slices of the flat vector), in plan order; a layer that shares nothing is alone."""
    group_of: dict[int, int] = {}  # slice start -> group
    groups: list[list[int]] = []
    for k, layer in enumerate(layers):
        starts = [layer.slices[n].start for n in layer.names]
        joined = sorted({group_of[s] for s in starts if s in group_of})
        if not joined:
            groups.append([k])
            target = len(groups) - 1
        else:
            target = joined[0]
            for other in joined[1:]:  # this layer links groups: merge them
                groups[target] += groups[other]
                groups[other] = []
                for start, g in group_of.items():
                    if g == other:
                        group_of[start] = target
            groups[target].append(k)
        for start in starts:
            group_of[start] = target
    return [sorted(g) for g in groups if g]


def coverage_failures(
    model: nn.Module,
    layers: Sequence[Layer],
    space: ParamSpace,
    loss: PerSampleLoss,
    x: Tensor,
    y: Tensor,
) -> dict[str, float]:
    """The parameters whose per-sample gradients (by the rules), summed with random weights
    ``r_i``, differ from autograd's gradient of ``Σ_i r_i f_i`` on ``(x, y)``, with their
    relative errors. Random weights also catch a rule that takes another axis for the samples
    (a sequence-first layer whose length equals the batch). Costs one weight-gradient-sized
    product per layer on these few samples."""
    params = list(space.params(model).values())
    r = torch.rand(len(x), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = (0.5 + r).to(dtype=space.dtype, device=space.device)
    calls, _, expected = capture_chunk(model, layers, loss, x, y, params, param_weights=r)
    products = CaptureProducts.from_calls(space, layers, calls, len(x))
    with full_precision():
        summed = space.unflatten(products.vjp(r))
    return uncovered(summed, expected, capture_dtype(calls))


def gram_failures(products: CaptureProducts) -> dict[str, float]:
    """The layers whose rule's Gram formula disagrees on its diagonal with the per-sample
    squared norms of the rule's own rows, with their relative errors: a wrong index in a
    ghost formula (one that takes the features for the samples where their sizes coincide)
    gives a wrong D without any other sign. Checks the layers whose calls keep a ghost
    Gram formula and whose rows over the chunk fit in :data:`ROWS_LIMIT`."""
    bad: dict[str, float] = {}
    for chunk in products._chunks():
        for layer, calls in zip(products.layers, chunk.calls, strict=True):
            if len(calls) != 1 or isinstance(calls[0], RowsCall):
                continue
            call, rule = calls[0], layer.rule
            numel = sum(products.layers_numel(layer))
            itemsize = products.space.dtype.itemsize
            if not rule.has_ghost_gram(layer.module, call) or (
                chunk.size * numel * itemsize > ROWS_LIMIT
            ):
                continue
            gram = rule.gram(layer.module, call, call, layer.names)
            if gram is None:
                continue
            rows = rule.per_sample(layer.module, call, layer.names)
            norms = sum(r.reshape(chunk.size, -1).square().sum(1) for r in rows.values())
            assert isinstance(norms, Tensor)
            tol = coverage_tolerance(norms.dtype, norms.device)
            error = float((gram.diagonal() - norms).norm())
            scale = max(float(norms.norm()), 1e-300)
            if not error <= tol * scale:
                bad[layer.name or "the model"] = error / scale
    return bad


def check_coverage(
    model: nn.Module,
    layers: Sequence[Layer],
    space: ParamSpace,
    loss: PerSampleLoss,
    x: Tensor,
    y: Tensor,
) -> None:
    """Raise :class:`CoverageError` unless, for every trainable parameter, the sum of the
    rules' per-sample gradients equals autograd's gradient of ``Σ_i f_i`` on ``(x, y)``
    (relative error at most :func:`coverage_tolerance`)."""
    bad = coverage_failures(model, layers, space, loss, x, y)
    if bad:
        raise CoverageError(
            f"the per-sample gradients of {describe(bad)} do not add up to the batch gradient: "
            f"{UNCOVERED_CAUSES}; use route='generic', which is exact for any model"
        )


TF32_EPS = 2.0**-10  # TF32 keeps 10 of float32's 23 mantissa bits


def coverage_tolerance(
    dtype: torch.dtype, device: torch.device, captured: torch.dtype | None = None
) -> float:
    """The relative error the coverage check allows: ``sqrt(eps)`` of the precision the
    products ran in. That is the dtype's, or the captures' where they are of lower precision
    (autocast's bfloat16: ``sqrt(2⁻⁷)`` = 0.088), except float32 on a CUDA device where TF32
    tensor cores may serve (cuDNN convolutions by default,
    ``torch.backends.cudnn.allow_tf32``; matrix products under
    ``torch.set_float32_matmul_precision("high")``): ``sqrt(2⁻¹⁰)`` = 0.031 there. All stay
    far below a tied weight's errors (of order 1)."""
    eps = torch.finfo(dtype).eps
    tf32 = torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and torch.device(device).type == "cuda" and tf32:
        eps = TF32_EPS
    if captured is not None:
        eps = max(eps, torch.finfo(captured).eps)
    return eps**0.5


def uncovered(
    summed: dict[str, Tensor],
    expected: Sequence[Tensor | None],
    captured: torch.dtype | None = None,
) -> dict[str, float]:
    """``{name: relative error}`` of the parameters whose summed per-sample gradients differ
    from autograd's gradient by more than :func:`coverage_tolerance` (for captures of dtype
    ``captured``), relatively."""
    bad = {}
    for (name, got), want in zip(summed.items(), expected, strict=True):
        want = torch.zeros_like(got) if want is None else want.to(got.dtype)
        tol = coverage_tolerance(got.dtype, got.device, captured)
        error, scale = float((got - want).norm()), max(float(want.norm()), float(got.norm()))
        if not error <= tol * scale:
            bad[name] = error / max(scale, 1e-300)
    return bad


def describe(failures: dict[str, float]) -> str:
    """``"fc1.weight (relative error 6.0e-01), ..."``."""
    return ", ".join(f"{name} (relative error {error:.1e})" for name, error in failures.items())
