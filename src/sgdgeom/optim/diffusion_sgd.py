r"""DiffusionMetricSGD: descent along the diffusion-metric gradient (Fioresi et al., eq. 10).

Each step uses the minibatch diffusion matrix :math:`D_B` (rank at most ``B - 1``) of the
batch just seen and moves along

.. math::

    -\nabla_{D} f = -(I + \varepsilon D_B)^{-1} \bar g \quad(\text{mode="exact"}),\qquad
    -(I - \varepsilon D_B)\, \bar g \quad(\text{mode="weak"}, \text{eq. 10}),

with :math:`\bar g` the minibatch gradient. Both are weighted sums of the per-sample
gradients, :math:`\bar g - \frac{\varepsilon}{B} \sum_i (w_i - \bar w) g_i`, with
:math:`w = c - \bar c` (weak) or :math:`w = (I + \varepsilon K)^{-1}(c - \bar c)` (exact),
:math:`c_i = g_i \cdot \bar g` and K the centred ``B x B`` Gram matrix
(:mod:`sgdgeom.metric`).

Two routes:

- **attached** (pass the model): the ordinary
  ``loss = criterion(model(x), y); loss.backward(); opt.step()``. A
  :class:`~sgdgeom.persample.recorder.LoopRecorder` hooks the owner module of every parameter
  (the layer rules of :mod:`sgdgeom.persample.layers`: Linear, Conv1d/2d, Embedding, norm
  layers, attention, and the ``torch.func`` fallback for any other module), so any model
  takes this route. The step is built from the passes that the backward reached: an extra
  forward (an evaluation inside the loop) is ignored, and gradient accumulation over several
  backward calls gives the D of the union of the micro-batches (the accumulated loss must be
  their mean: divide each micro-batch's mean loss by their number, the usual recipe).

  **Fused** (the default where exact, ``fused="auto"``): from the second step on, the layers
  run on detached parameters, so the backward computes input gradients only, and
  :meth:`step` forms ``∇_D f = Gᵀ(1 − εw)/B`` from the captures in place of the weight
  gradients, with ``c = G ḡ`` from the Gram matrix or a JVP. ``.grad`` of the model's
  parameters then stays ``None``: a loop that reads ``.grad`` between ``backward()`` and
  ``step()`` (gradient clipping, gradient monitors) needs ``fused=False``, and a gradient
  that reaches a parameter outside its module (a penalty on the weights) is an error, not a
  silent drop.

  **The first step is checked**: it runs unfused, and the mean of the per-sample gradients
  that the rules give must equal autograd's ``.grad`` for every parameter. A weight also
  used outside its module (tied weights), or a loss scaled otherwise than ``loss_reduction``
  says, fails with an error that names the parameter.
- **closure** (parameters instead of a model, a model with tied weights, or any step whose
  closure returns a vector): ``step(closure)`` with a closure that returns the *per-sample*
  losses ``(B,)`` with their graph; the per-sample gradients are materialised (``B x d``)
  by one batched backward.

Samples must be independent: BatchNorm in train mode couples them and is refused (at every
step, naming the layer). Dropout is fine: one forward has one mask, and the per-sample
gradients are those of that forward.

Under ``DistributedDataParallel`` (``torch.distributed`` initialised) the layers' captures are
all-gathered (``B x widths`` per layer, or the per-sample rows of small layers; never
``B x d``), so every process takes the step of the global batch's D; ``fused`` is off (DDP
all-reduces the ``.grad`` that fusing never makes).

The **Gram route** forms the ``B x B`` Gram matrix, which gives ``λ_max`` for
``eps="auto"`` (Lanczos on it, :func:`~sgdgeom.diffusion.top_eigenvalue`, relative residual
``1e-10``), ``c = G ḡ`` and the exact solve (Cholesky). The weak step with a fixed ε takes
the **matrix-free route** where it costs fewer multiply-adds at the batch's size
(:meth:`DiffusionMetricSGD._matrix_free_pays`; ``route`` names the last step's): ``c`` by
a JVP, never ``B x B``.

**On an accelerator** (``host_sync="auto"``) the step makes no host read: ``eps="auto"``
is ``safety / λ̄`` with ``λ̄`` a device-side upper bound on ``λ_max`` within 1% of it
(:func:`~sgdgeom.diffusion.top_eigenvalue_bounds`: a fixed number of squarings of the Gram
matrix, so ``ε λ_max ∈ [safety/1.01, safety]``), and a fixed ε is checked on the device.
A step that the host route would refuse (a non-finite Gram matrix, ``ε ≥ 1/λ_max``) moves
no parameter (its momentum buffers decay once) and raises at the next :meth:`step` or read
of ``stats``; ``stats`` is read from the device only when read. ``host_sync=True`` is the
CPU's route, exact ``λ_max`` by Lanczos, and the reference in the tests.

**CUDA graphs** (``capturable=True``, as in ``torch.optim``): the whole training step
(forward, backward, :meth:`step`) can be captured with ``torch.cuda.graph`` and replayed,
which removes the launches and the Python of the hooks from every step. Run two steps
eagerly first (the checked step and a fused one, on a side stream as PyTorch's CUDA-graph
recipe says), capture after ``zero_grad(set_to_none=True)``, then copy each batch into the
captured input tensors and replay. A replay refuses nothing at once: a refused step is
masked on the device and its error raised at the next read of ``stats``; the learning
rate, ε (a number), the mode and the batch size are those of the capture.

.. warning::
    ``weight_decay`` is decoupled: it is added after the metric, ``g⁻¹ ḡ + λ x``, so D
    stays the covariance of the data loss's per-sample gradients. ``eps="auto"``
    recomputes ``ε = safety / λ_max(D_B)`` at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.metric import DiffusionMetric, raise_for_status
from sgdgeom.optim.momentum import heavy_ball
from sgdgeom.params import ParamSpace
from sgdgeom.persample import CaptureProducts, CoverageError, RowProducts, plan_layers
from sgdgeom.persample.capture import (
    Chunk,
    compact_calls,
    coverage_failures,
    describe,
    uncovered,
)
from sgdgeom.persample.internal import internal_passes
from sgdgeom.persample.recorder import LoopRecorder, Pass, all_gather, gather_call

__all__ = ["DiffusionMetricSGD"]

LAMBDA_TOL = 1e-10  # relative Lanczos residual of λ_max for eps="auto"
_FUSED_DDP = (
    "fused=True does not run under DistributedDataParallel, which all-reduces the .grad "
    "that the fused route never makes: use fused=False (or 'auto')"
)


class _UnprobedError(Exception):
    """The model's output is not one batched tensor, so the sample check cannot probe it."""


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DiffusionMetricSGD(torch.optim.Optimizer):
    """SGD along the diffusion-metric gradient, with momentum and weight decay.

    Args:
        params: the model (attached route, any model: see the module docstring), or an
            iterable of parameters (closure route).
        lr: learning rate.
        eps: ``"auto"`` (``safety / λ_max`` of the batch's D) or a number below
            ``1/λ_max``; a step whose batch has ``ε ≥ 1/λ_max`` raises ``ValueError``.
        mode: ``"weak"`` (the paper's ``(I − εD) ḡ``) or ``"exact"`` (``(I + εD)⁻¹ ḡ``).
        safety: the fraction of ``1/λ_max`` that ``"auto"`` uses.
        momentum: as in ``torch.optim.SGD``.
        dampening: as in ``torch.optim.SGD``.
        nesterov: as in ``torch.optim.SGD``.
        weight_decay: as in ``torch.optim.SGD``, but decoupled (see the module warning).
        loss_reduction: ``"mean"`` (the loss is the mean of the per-sample losses over the
            samples since the last step, as PyTorch's losses by default) or ``"sum"``; the
            attached route needs it to turn the captured output gradients into per-sample
            ones, and the first step checks it.
        fused: ``"auto"`` (fused unless under DDP), ``True`` or ``False``: compute the metric
            gradient in place of the weight gradients (see the module docstring).
        host_sync: ``"auto"`` (``True`` on the CPU, ``False`` on an accelerator), ``True``
            (exact ``λ_max`` by Lanczos on the host; errors at once) or ``False`` (no host
            read in the step; errors one step late, see the module docstring).
        compile: on the device route, bound ``λ_max`` through ``torch.compile`` (one CUDA
            graph a step on a GPU; compiled once per batch size, seconds). The eager route
            is the reference it is tested against.
        capturable: make :meth:`step` capturable in a CUDA graph with the forward and
            backward (see the module docstring): no host read and no deferred check in
            the step; refusals accumulate on the device and raise at the next ``stats``.

    After each step, ``stats`` holds the batch's ``eps`` and ``trace`` (tr D) and, with
    ``eps="auto"``, the ``lambda_max`` it was derived from.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = DiffusionMetricSGD(model, lr=0.1, eps="auto", mode="exact")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = nn.functional.cross_entropy(model(x), y)
        >>> loss.backward()
        >>> opt.step()
        >>> 0 < opt.stats["eps"] * opt.stats["lambda_max"] < 1
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: float | str = "auto",
        mode: str = "weak",
        safety: float = 0.5,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        loss_reduction: str = "mean",
        fused: bool | str = "auto",
        host_sync: bool | str = "auto",
        compile: bool = False,
        capturable: bool = False,
    ) -> None:
        if lr < 0:
            raise InputError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise InputError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise InputError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InputError("Nesterov momentum requires a momentum and zero dampening")
        if mode not in ("weak", "exact"):
            raise InputError(f"Invalid mode: {mode!r}; choose 'weak' or 'exact'")
        if (isinstance(eps, str) and eps != "auto") or (not isinstance(eps, str) and eps < 0):
            raise InputError(f"Invalid eps: {eps!r}; use 'auto' or a number >= 0")
        if not 0 < safety < 1:
            raise InputError(f"Invalid safety: {safety}; it must lie in (0, 1)")
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"Invalid loss_reduction: {loss_reduction!r}; choose mean or sum")
        if fused not in ("auto", True, False):
            raise InputError(f"Invalid fused: {fused!r}; choose 'auto', True or False")
        if host_sync not in ("auto", True, False):
            raise InputError(f"Invalid host_sync: {host_sync!r}; choose 'auto', True or False")
        if capturable and host_sync is True:
            raise InputError("capturable=True reads nothing on the host: host_sync=True is not")
        if capturable and not isinstance(params, nn.Module):
            raise InputError("capturable=True needs the model itself (the attached route)")
        self.host_sync, self.compile, self.capturable = host_sync, compile, capturable
        self._refused: Tensor | None = None  # capturable: the worst status since the last read
        self.model = params if isinstance(params, nn.Module) else None
        self.loss_reduction = loss_reduction
        self._stats: dict[str, float | Tensor] = {}
        self._pending: _PendingCheck | None = None
        self._recorder: LoopRecorder | None = None
        self._unattached = (
            "DiffusionMetricSGD was given parameters, not the model: pass the model itself "
            "for the ordinary loss.backward(); opt.step() loop"
        )
        self._batchnorms: list[tuple[str, nn.Module]] = []
        if fused is True and self.model is None:
            raise InputError(
                "fused=True needs the model itself (pass the model, not its parameters)"
            )
        if fused is True and _distributed():
            raise InputError(_FUSED_DDP)
        if self.model is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            self._batchnorms = [
                (n, m)
                for n, m in self.model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            try:
                layers = plan_layers(self.model)
            except CoverageError as err:
                self._unattached = str(err)
            else:
                fuse = fused is True or (fused == "auto" and not _distributed())
                self._recorder = LoopRecorder(self.model, layers, fused=fuse)
        self.fused = bool(self._recorder is not None and self._recorder.fused)
        self._checked = False
        self.route = "gram"  # the last step's: "gram" or "matrix-free"
        defaults = {
            "lr": lr,
            "eps": eps,
            "mode": mode,
            "safety": safety,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        names = (
            [n for n, _ in named]
            if self.model is not None
            else [f"p{i}" for i in range(sum(len(g["params"]) for g in self.param_groups))]
        )
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = names

    @property
    def space(self) -> ParamSpace:
        """The parameter space as the parameters are now (the model may have moved to another
        device or dtype since the optimizer was made)."""
        return ParamSpace(zip(self._names, self._params, strict=True))

    @property
    def stats(self) -> dict[str, float]:
        """The last step's ``eps``, ``trace`` (tr D) and, with ``eps="auto"``, the
        ``lambda_max`` it came from (on the device route: the lower bound ``θ`` beside the
        upper bound ``lambda_bound`` that ε used). Reading them waits for the device, and
        raises the error of a refused step."""
        self._raise_pending()
        self._raise_refused()
        return {name: float(value) for name, value in self._stats.items()}

    def _raise_refused(self) -> None:
        if self._refused is not None and int(self._refused):
            status = int(self._refused)
            self._refused.zero_()
            raise_for_status(
                status,
                self._stats["eps"],
                "a step since the last read of stats was refused and moved no parameter: ",
            )

    def _raise_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.raise_if_refused()

    def _syncs_with_host(self, device: torch.device) -> bool:
        if self.capturable:
            return False
        return device.type == "cpu" if self.host_sync == "auto" else bool(self.host_sync)

    @property
    def attached(self) -> bool:
        """Whether the step reads per-sample information from hooks (else: closure)."""
        return self._recorder is not None

    def detach(self) -> None:
        """Remove the hooks from the model and give its layers their own forward back."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
            self._unattached = "the optimizer was detached from the model"

    # ------------------------------------------------------------------ attached route

    def _check_independent(self) -> None:
        for name, module in self._batchnorms:
            if module.training or module.running_mean is None:
                raise UnsupportedModelError(
                    f"BatchNorm layer {name!r} normalises with batch statistics, so a sample's "
                    f"loss depends on the others and per-sample gradients are not defined: "
                    f"use GroupNorm or LayerNorm, or put that layer in eval mode"
                )

    def _products(self, passes: list[Pass], space: ParamSpace) -> CaptureProducts:
        """The captured passes as one set of products (one chunk per pass), all-gathered
        under DDP, scaled from the mean loss's output gradients to the per-sample ones."""
        recorder = self._recorder
        world = torch.distributed.get_world_size() if _distributed() else 1
        chunks, start, local = [], 0, 0
        for recorded in passes:
            calls = [
                compact_calls(layer, layer_calls, recorded.size)
                for layer, layer_calls in zip(
                    recorder.layers, recorder.calls(recorded), strict=True
                )
            ]
            if world > 1:
                calls = [[gather_call(call) for call in layer_calls] for layer_calls in calls]
            chunks.append(Chunk(start, recorded.size * world, calls, None))
            start += recorded.size * world
            local += recorded.size
        scale = local if self.loss_reduction == "mean" else 1.0
        return CaptureProducts.from_chunks(space, recorder.layers, chunks, scale)

    def _check_samples(self, inputs: Tensor, space: ParamSpace) -> None:
        """The first step, part two: the samples must be what the rules take for samples.
        On 8 of the step's inputs, with the per-sample "loss" ``f_i = u · model(x)_i`` for a
        fixed ``u``, the rules' per-sample gradients weighted by random ``r_i`` must equal
        autograd's gradient of ``Σ_i r_i f_i``: a layer that takes another axis for the
        samples (sequence-first, with a length equal to the batch) fails it."""

        def probe(output: Any, _: Any) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() == 0:
                raise _UnprobedError
            flat = output.flatten(1)
            u = torch.linspace(-1.0, 1.0, flat.shape[1], dtype=flat.dtype, device=flat.device)
            return flat @ u

        x = inputs[:8]
        try:
            bad = coverage_failures(self.model, self._recorder.layers, space, probe, x, x)
        except _UnprobedError:
            return  # the output is not one batched tensor: the first check alone
        except RuntimeError as err:  # a layer's calls lack the batch along dim 0
            bad = {f"a layer's calls ({err})": float("nan")}
        if bad:
            self.detach()
            self._unattached = (
                f"per-sample gradients of {describe(bad)} are not exact: a parameter is also "
                f"used outside its module's forward (tied weights?), or a layer takes another "
                f"axis than dim 0 for the samples (sequence-first?): call step(closure) with a "
                f"closure that returns the per-sample losses (B,)"
            )
            raise CoverageError(self._unattached)

    def _check_coverage(self, products: CaptureProducts, mean_gradient: Tensor) -> None:
        """The first step: the rules' mean per-sample gradient must be autograd's ``.grad``."""
        space = products.space
        weights = torch.full((products.n,), 1 / products.n, dtype=space.dtype, device=space.device)
        summed = space.unflatten(products.vjp(weights))
        expected = list(space.unflatten(mean_gradient).values())
        bad = uncovered(summed, expected)
        if not bad:
            return
        ratios = [
            float(e.norm() / g.norm()) for g, e in zip(summed.values(), expected, strict=True)
        ]
        hint = (
            f"the loss's gradient is {ratios[0]:.4g} times the mean of the per-sample gradients "
            f"for every parameter: loss_reduction={self.loss_reduction!r} does not match the "
            f"loss (with gradient accumulation, divide each micro-batch's mean loss by their "
            f"number)"
            if len(bad) == len(ratios) and max(ratios) - min(ratios) < 1e-6 * max(ratios)
            else "a parameter is also used outside its module's forward (tied weights?): call "
            "step(closure) with a closure that returns the per-sample losses (B,)"
        )
        self.detach()
        self._unattached = f"per-sample gradients of {describe(bad)} are not exact: {hint}"
        raise CoverageError(self._unattached)

    def _attached_products(self, space: ParamSpace) -> tuple[CaptureProducts, Tensor | None]:
        """The step's products and, unless fused, the mean gradient from ``.grad``; raises
        where a step would be wrong."""
        recorder = self._recorder
        self._check_independent()
        passes = recorder.take()
        if not passes:
            raise RuntimeError(
                "DiffusionMetricSGD saw no backward through the model since the last step: "
                "call loss.backward() on the model's output before step() (a forward alone, "
                "or one under torch.no_grad(), makes no step)"
            )
        first = not self._checked and not recorder.fusing
        if first and passes[0].inputs is not None and not _distributed():
            self._check_samples(passes[0].inputs, space)
        products = self._products(passes, space)
        if recorder.fusing:
            stray = [
                n
                for n, p in zip(self._names, self._params, strict=True)
                if p.grad is not None and bool(p.grad.any())
            ]
            if stray:
                raise RuntimeError(
                    f"{', '.join(stray)} received a gradient outside the fused layers (a "
                    f"penalty on the weights, or .grad set by hand); the fused step reads the "
                    f"captures only: use fused=False"
                )
            return products, None
        mean_gradient = self._mean_gradient(space)
        if first:
            self._check_coverage(products, mean_gradient)
            self._checked = True
            if recorder.fused:  # checked: from now on the backward skips weight gradients
                recorder.fusing = True
                for p in self._params:
                    p.grad = None
        return products, mean_gradient

    # ------------------------------------------------------------------ step

    def _mean_gradient(self, space: ParamSpace) -> Tensor:
        return space.flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step. Attached route: after ``loss.backward()``; an optional closure
        re-evaluates the loss and calls backward, as in ``torch.optim``. Closure route: the
        closure returns the per-sample losses ``(B,)`` (no backward); ``.grad`` is set to
        their mean gradient."""
        self._raise_pending()
        group = self.param_groups[0]
        if any(
            g["eps"] != group["eps"] or g["mode"] != group["mode"] or g["safety"] != group["safety"]
            for g in self.param_groups
        ):
            raise InputError(
                "eps, mode and safety are global to the metric: use the same "
                "values in every param group"
            )
        loss = None
        space = self.space
        losses = None
        if self._recorder is not None and closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss.dim() == 1 and loss.requires_grad:  # per-sample losses: closure route
                losses, loss = loss, None
        if self._recorder is not None and losses is None:
            idle = not self._recorder.passes and all(p.grad is None for p in self._params)
            if idle and not self._recorder.fusing:
                return loss  # no forward, no gradient: no step (torch.optim's contract)
            products, mean_gradient = self._attached_products(space)
        else:
            if closure is None:
                raise RuntimeError(
                    f"{self._unattached}; or call step(closure) with a closure that returns "
                    f"the per-sample losses (B,)"
                )
            self._check_independent()
            if self._recorder is not None:
                self._recorder.take()  # the closure's forward is not a loop's pass
            with torch.enable_grad(), internal_passes():
                losses = closure() if losses is None else losses
                products = RowProducts.from_losses(space, self._params, losses)
            if _distributed():
                products = RowProducts(space, all_gather(products.rows))
            loss = losses.detach().mean()
            mean_gradient = products.rows.mean(0)
            for p, g in zip(self._params, space.unflatten(mean_gradient).values(), strict=True):
                p.grad = g.clone()
        direction, keep = self._direction(products, mean_gradient, group)
        self._apply(space.unflatten(direction), keep)
        return loss

    def _direction(
        self,
        products: CaptureProducts | RowProducts,
        mean_gradient: Tensor | None,
        group: dict[str, Any],
    ) -> tuple[Tensor, Tensor | None]:
        """The step's direction and, on the device route, the 0-d mask (1 or 0) of the
        update: 0 where the host route would have raised."""
        D = DiffusionMatrix.from_products(products, mean_gradient=mean_gradient)
        host_sync = self._syncs_with_host(D.space.device)
        matrix_free = self._matrix_free_pays(D, mean_gradient is None, group)
        if not matrix_free:
            D.gram()  # built once: it gives λ_max, tr D, the exact solve and c = G ḡ
        metric = DiffusionMetric(
            D,
            group["eps"],
            group["safety"],
            lambda_tol=LAMBDA_TOL,
            matrix_free=matrix_free,
            host_sync=host_sync,
            compile=self.compile and not self.capturable,  # the graph takes it all
        )
        self.route = "matrix-free" if matrix_free else "gram"
        self._stats = {"eps": metric.eps, "trace": D.trace_tensor()}
        if group["eps"] == "auto" and host_sync:  # known already; a fixed ε never needs it
            self._stats["lambda_max"] = metric.lambda_max
        elif group["eps"] == "auto":
            self._stats["lambda_max"], self._stats["lambda_bound"] = metric.lambda_bounds
        direction = metric.gradient(
            exact=group["mode"] == "exact", out=self._scratch(products.space)
        )
        if metric.status is None:
            return direction, None
        keep = metric.status == DiffusionMetric.VALID
        direction.masked_fill_(~keep, 0.0)  # a NaN direction would poison the momentum
        if self.capturable:  # no host work in a captured step: kept on the device
            if self._refused is None:
                self._refused = torch.zeros_like(metric.status)
            torch.maximum(self._refused, metric.status, out=self._refused)
        else:
            self._pending = _PendingCheck(metric.status, metric.eps)
        return direction, keep.to(direction.dtype)

    def _matrix_free_pays(
        self, D: DiffusionMatrix, needs_mean: bool, group: dict[str, Any]
    ) -> bool:
        """Whether the weak step with a fixed ε costs fewer multiply-adds without the Gram
        matrix: ``c = G ḡ`` by one JVP of cost ``P``
        (:meth:`~sgdgeom.persample.PerSampleProducts.costs`; ``2P`` fused, where ``ḡ``
        comes first) against the Gram matrix's. On the 784-784-784-10 MLP (``B in out``
        against ``B²(in + out)`` a layer, fused) it crosses over at ``B ≈ 2 in out / (in +
        out) = 784``. A fixed ε with ``ε tr D ≥ 1`` takes the Gram route, whose Cholesky
        factorisation checks it: on the device route too, this choice reads ``tr D`` on
        the host, the one host read of a device-route step (a refusal of an ε that only
        ``ε tr D < 1`` cannot prove would be an error where there is none). A capturable
        step cannot read it: there such an ε is refused (``ε tr D < 1`` is checked on the
        device), and a smaller ε or the uncaptured step takes it.

        ε auto and the exact solve stay on the Gram route: their matrix-free forms take
        two products per Lanczos or conjugate-gradient step (about 12 and 5–8 steps), and
        products over stored per-sample rows are matrix-vector products, bound by memory:
        counted in multiply-adds they looked cheaper on the transformer of
        ``benchmarks/optim.py`` and ran 2.2x slower (4.9x a step against 2.2x). They
        remain available as ``DiffusionMetric(..., matrix_free=True)``.
        """
        if group["eps"] == "auto" or group["mode"] == "exact":
            return False
        product, gram = D.products.costs()
        if product * (2 if needs_mean else 1) >= gram:
            return False
        return self.capturable or float(group["eps"]) * D.trace() < 1

    def _scratch(self, space: ParamSpace) -> Tensor:
        """A ``(d,)`` buffer for the direction, kept across steps: allocating ``d`` fresh
        floats every step costs page faults that show in a step's time."""
        buffer = self.__dict__.get("_direction_buffer")
        if buffer is None or (buffer.numel(), buffer.dtype, buffer.device) != (
            space.dim,
            space.dtype,
            space.device,
        ):
            buffer = self._direction_buffer = torch.empty(
                space.dim, dtype=space.dtype, device=space.device
            )
        return buffer

    def _apply(self, parts: dict[str, Tensor], keep: Tensor | None = None) -> None:
        """The heavy-ball update; ``keep`` (0-d, 1 or 0) masks it without a host read."""
        steps = iter(parts.values())
        for group in self.param_groups:
            params = group["params"]
            directions = [next(steps) for _ in params]
            states = [self.state[p] for p in params]
            update = heavy_ball(directions, params, group, states)
            if keep is not None:
                update = torch._foreach_mul(update, keep)
            torch._foreach_add_(params, update, alpha=-group["lr"])


class _PendingCheck:
    """A device route's status code, copied to the host without waiting for it; read (and
    raised) at the next step, when the device has long finished it."""

    def __init__(self, status: Tensor, eps: float | Tensor) -> None:
        self.host = status.to("cpu", non_blocking=True)
        self.eps = eps
        self.event = None
        if status.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def raise_if_refused(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        raise_for_status(
            int(self.host), self.eps, "the last step was refused and moved no parameter: "
        )
