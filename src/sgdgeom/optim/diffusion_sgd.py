r"""DiffusionMetricSGD: descent along the diffusion-metric gradient (Fioresi et al., eq. 10).

Each step uses the minibatch diffusion matrix :math:`D_B` (rank at most ``B - 1``) of the
batch just seen and moves along

.. math::

    -\nabla_{D} f = -(I + \varepsilon D_B)^{-1} \bar g \quad(\text{inverse="exact"}),\qquad
    -(I - \varepsilon D_B)\, \bar g \quad(\text{inverse="weak"}, \text{eq. 10}),

with :math:`\bar g` the minibatch gradient. Both are weighted sums of the per-sample
gradients, :math:`\bar g - \frac{\varepsilon}{B} \sum_i (w_i - \bar w) g_i`, with
:math:`w = c - \bar c` (weak) or :math:`w = (I + \varepsilon K)^{-1}(c - \bar c)` (exact),
:math:`c_i = g_i \cdot \bar g` and K the centred ``B x B`` Gram matrix
(:mod:`sgdgeom.metric`).

Two ways to feed it the per-sample gradients:

- **the hooked loop** (pass the model): the ordinary
  ``loss = criterion(model(x), y); loss.backward(); opt.step()``. A
  :class:`~sgdgeom.persample.StepCapture` hooks the owner module of every parameter
  (the layer rules of :mod:`sgdgeom.persample.layers`: Linear, Conv1d/2d, Embedding, norm
  layers, attention, and the ``torch.func`` fallback for any other module), so any model
  can be fed this way. The step is built from the passes that the backward reached: an extra
  forward (an evaluation inside the loop) is ignored, and gradient accumulation over several
  backward calls gives the D of the union of the micro-batches (the accumulated loss must be
  their mean: divide each micro-batch's mean loss by their number, the usual recipe).

  **Fused** (the default where exact, ``fused="auto"``): from the second step on, the layers
  run on detached parameters, so the backward computes input gradients only, and
  :meth:`step` forms ``∇_D f = Gᵀ(1 − εw)/B`` from the captures in place of the weight
  gradients, with ``c = G ḡ`` from the Gram matrix or a JVP. ``.grad`` of the model's
  parameters then stays ``None``: a loop that reads ``.grad`` between ``backward()`` and
  ``step()`` (gradient clipping, gradient monitors) needs ``fused="off"``, and a gradient
  that reaches a parameter outside its module (a penalty on the weights) is an error, not a
  silent drop.

  **The first step is checked**: it runs unfused, and the mean of the per-sample gradients
  that the rules give must equal autograd's ``.grad`` for every parameter. A weight also
  used outside its module (tied weights) fails with an error that names the parameter.

  **What the loop does to** ``.grad`` **counts** (unfused): a ``.grad`` changed between
  ``backward()`` and ``step()`` (``clip_grad_norm_``, a penalty added by hand) is seen,
  and the step is ``g⁻¹`` of it, with D still that of the captured per-sample gradients
  (one more JVP). With ``loss_reduction="sum"`` the step is that of the summed loss, ``B``
  times the mean's, as ``torch.optim.SGD`` would take. Samples the loss leaves out
  (``ignore_index``, a loss on part of the output) have a zero gradient and are refused
  (``zero_gradient_samples``).
- **the closure step** (parameters instead of a model, a model with tied weights, or any step
  whose closure returns a vector): ``step(closure)`` with a closure that returns the *per-sample*
  losses ``(B,)`` with their graph; the per-sample gradients are materialised (``B x d``)
  by one batched backward.

Samples must be independent: BatchNorm in train mode couples them and is refused (at every
step, naming the layer). Dropout is fine: one forward has one mask, and the per-sample
gradients are those of that forward.

Under ``DistributedDataParallel`` (``torch.distributed`` initialised) the layers' captures are
all-gathered (``B x widths`` per layer, or the per-sample rows of small layers; never
``B x d``), so every process takes the step of the global batch's D; ``fused`` is off (DDP
all-reduces the ``.grad`` that fusing never makes).

The step solves with one of two **solvers**. ``"gram"`` forms the ``B x B`` Gram matrix,
which gives ``λ_max`` for ``eps="auto"`` (Lanczos on it,
:func:`~sgdgeom.linalg.top_eigenvalue`, relative residual ``1e-10``), ``c = G ḡ`` and the
exact solve (Cholesky). The weak step with a fixed ε takes
``"matrix-free"`` where it costs fewer multiply-adds at the batch's size
(:meth:`DiffusionMetricSGD._matrix_free_pays`; ``solver`` names the last step's): ``c`` by
a JVP, never ``B x B``.

**On an accelerator** (``sync="auto"``) the step makes no host read: ``eps="auto"``
is ``eps_fraction / λ̄`` with ``λ̄`` a device-side upper bound on ``λ_max`` within 1% of it
(:func:`~sgdgeom.linalg.top_eigenvalue_bounds`: a fixed number of squarings of the Gram
matrix, so ``ε λ_max ∈ [fraction/1.01, fraction]``), and a fixed ε is checked on the device.
A step that a host-synchronised step would refuse (a non-finite Gram matrix,
``ε ≥ 1/λ_max``) moves no parameter (its momentum buffers decay once) and raises at the
next :meth:`step` or read of ``stats``; ``stats`` is read from the device only when read.
``sync="host"`` is the CPU's default, exact ``λ_max`` by Lanczos, and the reference in the
tests.

**CUDA graphs** (``capturable=True``, as in ``torch.optim``): the whole training step
(forward, backward, :meth:`step`) can be captured with ``torch.cuda.graph`` and replayed,
which removes the launches and the Python of the hooks from every step. Run two steps
eagerly first (the checked step and a fused one, on a side stream as PyTorch's CUDA-graph
recipe says), capture after ``zero_grad(set_to_none=True)``, then copy each batch into the
captured input tensors and replay. A replay refuses nothing at once: a refused step is
masked on the device and its error raised at the next read of ``stats``; the learning
rate, ε (a number), the inverse and the batch size are those of the capture.

.. warning::
    ``weight_decay`` is decoupled: it is added after the metric, ``g⁻¹ ḡ + λ x``, so D
    stays the covariance of the data loss's per-sample gradients. ``eps="auto"``
    recomputes ``ε = eps_fraction / λ_max(D_B)`` at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from sgdgeom._deprecated import renamed, warn
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import Epsilon, EpsilonLike
from sgdgeom.errors import InputError
from sgdgeom.metric import (
    SAMPLES_LEFT_OUT,
    DiffusionMetric,
    Inverse,
    inverse_of,
    raise_for_status,
)
from sgdgeom.optim.momentum import heavy_ball
from sgdgeom.optim.registry import OPTIMIZERS, OptimizerOptions, register_optimizer
from sgdgeom.params import ParamSpace
from sgdgeom.persample import (
    CaptureProducts,
    CoverageError,
    LossReduction,
    RowProducts,
    StepCapture,
    all_gather,
    check_independent_samples,
    distributed,
    internal_passes,
)
from sgdgeom.precision import full_precision

__all__ = [
    "DiffusionMetricSGD",
    "DiffusionMetricSGDOptions",
    "Fused",
    "Solver",
    "StepSync",
    "ZeroGradientSamples",
]

LAMBDA_TOL = 1e-10  # relative Lanczos residual of λ_max for eps="auto"

Fused = Literal["auto", "on", "off"]
"""Whether the hooked loop's backward skips the weight gradients (``"auto"``: unless under
DDP)."""
StepSync = Literal["auto", "host", "device"]
"""Where a step's decisions are read (``"auto"``: on the host on the CPU, else on the
device); see :data:`sgdgeom.metric.Sync`."""
ZeroGradientSamples = Literal["refuse", "keep"]
"""What the hooked loop does with samples whose gradient is exactly zero while others' is
not: a loss that leaves samples out gives them (``"refuse"``), a hinge loss may (``"keep"``
counts them in D as samples with a zero gradient)."""
Solver = Literal["gram", "matrix-free"]
"""How a step solved: through the ``B x B`` Gram matrix, or by products alone."""

_FUSED_DDP = (
    "fused='on' does not run under DistributedDataParallel, which all-reduces the .grad "
    "that a fused step never makes: use fused='off' (or 'auto')"
)


class DiffusionMetricSGD(torch.optim.Optimizer):
    """SGD along the diffusion-metric gradient, with momentum and weight decay.

    Mixed precision: the forward and backward may run under ``torch.autocast`` (the
    captures stay in its dtype; the step computes in float32, and writes the update in the
    parameters' dtype, bfloat16 parameters included), and ``torch.amp.GradScaler`` drives
    it as it drives torch.optim (``scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update()``): the step unscales ``.grad`` and the captures itself, a step with
    an overflow is skipped and changes nothing.

    Args:
        params: the model (the hooked loop, any model: see the module docstring), or an
            iterable of parameters (the closure step).
        lr: learning rate.
        eps: ``"auto"`` (``eps_fraction / λ_max`` of the batch's D), a number below
            ``1/λ_max`` or an :class:`~sgdgeom.epsilon.Epsilon`; a step whose batch has
            ``ε ≥ 1/λ_max`` raises ``ValueError``.
        inverse: ``"weak"`` (the paper's ``(I − εD) ḡ``) or ``"exact"`` (``(I + εD)⁻¹ ḡ``).
        eps_fraction: the fraction of ``1/λ_max`` that ``"auto"`` takes (default 0.5).
        momentum: as in ``torch.optim.SGD``.
        dampening: as in ``torch.optim.SGD``.
        nesterov: as in ``torch.optim.SGD``.
        weight_decay: as in ``torch.optim.SGD``, but decoupled (see the module warning).
        loss_reduction: ``"mean"`` (the loss is the mean of the per-sample losses over the
            samples since the last step, as PyTorch's losses by default) or ``"sum"``; the
            hooked loop needs it to turn the captured output gradients into per-sample
            ones, and the first step checks it.
        fused: ``"auto"`` (on unless under DDP), ``"on"`` or ``"off"``: compute the metric
            gradient in place of the weight gradients (see the module docstring).
        sync: ``"auto"`` (``"host"`` on the CPU, ``"device"`` on an accelerator),
            ``"host"`` (exact ``λ_max`` by Lanczos on the host; errors at once) or
            ``"device"`` (no host read in the step; errors one step late, see the module
            docstring).
        compile: with ``sync="device"``, bound ``λ_max`` through ``torch.compile`` (one CUDA
            graph a step on a GPU; compiled once per batch size, seconds). The eager
            bound is the reference it is tested against.
        capturable: make :meth:`step` capturable in a CUDA graph with the forward and
            backward (see the module docstring): no host read and no deferred check in
            the step; refusals accumulate on the device and raise at the next ``stats``.
        zero_gradient_samples: ``"refuse"`` (a hooked step where some samples of the
            forward have an exactly zero gradient and others not: the loss left them out,
            by ``ignore_index`` or by taking part of the output, and D over the forward's
            samples would be wrong) or ``"keep"`` (they are samples of the loss whose
            gradient is zero, as a hinge loss gives).

    Old spellings, kept for one release with a ``DeprecationWarning``: ``mode`` for
    ``inverse``, ``safety`` for ``eps_fraction``, ``host_sync=True/False`` for
    ``sync="host"/"device"``, ``fused=True/False`` for ``"on"/"off"``.

    After each step, ``stats`` holds the batch's ``eps`` and ``trace`` (tr D) and, with
    ``eps="auto"``, the ``lambda_max`` it was derived from.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = DiffusionMetricSGD(model, lr=0.1, eps="auto", inverse="exact")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = nn.functional.cross_entropy(model(x), y)
        >>> loss.backward()
        >>> opt.step()
        >>> 0 < opt.stats["eps"] * opt.stats["lambda_max"] < 1
        True
    """

    #: ``torch.amp.GradScaler`` hands over the loss scale instead of unscaling ``.grad``
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: EpsilonLike = "auto",
        inverse: Inverse = "weak",
        eps_fraction: float = 0.5,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        loss_reduction: LossReduction = "mean",
        fused: Fused = "auto",
        sync: StepSync = "auto",
        compile: bool = False,
        capturable: bool = False,
        zero_gradient_samples: ZeroGradientSamples = "refuse",
        *,
        mode: Inverse | None = None,
        safety: float | None = None,
        host_sync: bool | str | None = None,
    ) -> None:
        if mode is not None:
            warn(f"DiffusionMetricSGD(mode={mode!r})", f"inverse={mode!r}")
            inverse = mode
        if safety is not None:
            warn("DiffusionMetricSGD(safety=...)", "eps_fraction=...")
            eps_fraction = safety
        if host_sync is not None:
            sync = renamed("host_sync", host_sync, {True: "host", False: "device"}, "sync")
        fused = renamed("fused", fused, {True: "on", False: "off"})
        if lr < 0:
            raise InputError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise InputError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise InputError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InputError("Nesterov momentum requires a momentum and zero dampening")
        if inverse not in ("weak", "exact"):
            raise InputError(f"Invalid inverse: {inverse!r}; choose 'weak' or 'exact'")
        if not 0 < eps_fraction < 1:
            raise InputError(f"Invalid eps_fraction: {eps_fraction}; it must lie in (0, 1)")
        try:
            Epsilon.parse(eps, eps_fraction)
        except InputError:
            raise InputError(f"Invalid eps: {eps!r}; use 'auto' or a number >= 0") from None
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"Invalid loss_reduction: {loss_reduction!r}; choose mean or sum")
        if fused not in get_args(Fused):
            raise InputError(f"Invalid fused: {fused!r}; choose 'auto', 'on' or 'off'")
        if sync not in get_args(StepSync):
            raise InputError(f"Invalid sync: {sync!r}; choose 'auto', 'host' or 'device'")
        if zero_gradient_samples not in get_args(ZeroGradientSamples):
            raise InputError(
                f"Invalid zero_gradient_samples: {zero_gradient_samples!r}; choose 'refuse' "
                f"or 'keep'"
            )
        self.zero_gradient_samples = zero_gradient_samples
        if capturable and sync == "host":
            raise InputError("capturable=True reads nothing on the host: sync='host' is not")
        if capturable and not isinstance(params, nn.Module):
            raise InputError("capturable=True needs the model itself (the hooked loop)")
        self.sync, self.compile, self.capturable = sync, compile, capturable
        self._refused: Tensor | None = None  # capturable: the worst status since the last read
        self.model = params if isinstance(params, nn.Module) else None
        self.loss_reduction = loss_reduction
        self._stats: dict[str, float | Tensor] = {}
        self._pending: _PendingCheck | None = None
        self._capture: StepCapture | None = None
        self._unattached = (
            "DiffusionMetricSGD was given parameters, not the model: pass the model itself "
            "for the ordinary loss.backward(); opt.step() loop"
        )
        if fused == "on" and self.model is None:
            raise InputError(
                "fused='on' needs the model itself (pass the model, not its parameters)"
            )
        if fused == "on" and distributed():
            raise InputError(_FUSED_DDP)
        if self.model is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            try:
                self._capture = StepCapture(
                    self.model,
                    fused=fused == "on" or (fused == "auto" and not distributed()),
                    loss_reduction=loss_reduction,
                )
            except CoverageError as err:
                self._unattached = str(err)
        self.fused = bool(self._capture is not None and self._capture.fused)
        self.solver: Solver = "gram"  # the last step's
        defaults = {
            "lr": lr,
            "eps": eps,
            "inverse": inverse,
            "eps_fraction": eps_fraction,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)  # type: ignore[arg-type]  # a model became its params
        names = (
            [n for n, _ in named]
            if self.model is not None
            else [f"p{i}" for i in range(sum(len(g["params"]) for g in self.param_groups))]
        )
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = names

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As in ``torch.optim``; on the hooked loop only the model's own parameters in one
        group are stepped, so a group added later is refused."""
        if "_params" not in self.__dict__:  # the constructor's groups
            super().add_param_group(param_group)
            return
        if self.model is not None:
            raise InputError(
                "DiffusionMetricSGD steps the model it was given, in one group: it cannot take "
                "another param group; step other parameters with an optimizer of their own"
            )
        super().add_param_group(param_group)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = [f"p{i}" for i in range(len(self._params))]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Groups saved under the old key names (``mode``, ``safety``) are read under the
        new ones."""
        super().__setstate__(state)
        for group in self.param_groups:
            if "mode" in group:
                group.setdefault("inverse", group.pop("mode"))
            if "safety" in group:
                group.setdefault("eps_fraction", group.pop("safety"))

    @property
    def route(self) -> str:
        """Deprecated: :attr:`solver`."""
        warn("DiffusionMetricSGD.route", "DiffusionMetricSGD.solver")
        return self.solver

    @property
    def space(self) -> ParamSpace:
        """The parameter space as the parameters are now (the model may have moved to another
        device or dtype since the optimizer was made)."""
        return ParamSpace(zip(self._names, self._params, strict=True))

    @property
    def stats(self) -> dict[str, float]:
        """The last step's ``eps``, ``trace`` (tr D) and, with ``eps="auto"``, the
        ``lambda_max`` it came from (with ``sync="device"``: the lower bound ``θ`` beside the
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
        return device.type == "cpu" if self.sync == "auto" else self.sync == "host"

    @property
    def attached(self) -> bool:
        """Whether the step reads per-sample information from hooks (else: a closure)."""
        return self._capture is not None

    def detach(self) -> None:
        """Remove the hooks from the model and give its layers their own forward back."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
            self._unattached = "the optimizer was detached from the model"

    def _hooked_products(
        self, space: ParamSpace, loss_scale: float | None
    ) -> tuple[CaptureProducts, Tensor | None]:
        """The step's products from the hooks (and the mean gradient unless fused); a model
        the first step's checks refuse is detached, and the closure step named."""
        assert self._capture is not None
        try:
            return self._capture.take(space, self._params, self._names, loss_scale=loss_scale)
        except CoverageError as err:
            self.detach()
            self._unattached = str(err)
            raise

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    @full_precision()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step. Hooked loop: after ``loss.backward()``; an optional closure
        re-evaluates the loss and calls backward, as in ``torch.optim``. Closure step: the
        closure returns the per-sample losses ``(B,)`` (no backward); ``.grad`` is set to
        their mean gradient."""
        self._raise_pending()
        group = self.param_groups[0]
        if any(
            g["eps"] != group["eps"]
            or g["inverse"] != group["inverse"]
            or g["eps_fraction"] != group["eps_fraction"]
            for g in self.param_groups
        ):
            raise InputError(
                "eps, inverse and eps_fraction are global to the metric: use the same "
                "values in every param group"
            )
        loss = None
        space = self.space
        losses = None
        capture = self._capture
        loss_scale = self._loss_scale(closure)
        if loss_scale == 0.0:  # GradScaler found an overflow: skipped, nothing changes
            if capture is not None:
                capture.forget()
            return None
        if capture is not None and closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss.dim() == 1 and loss.requires_grad:  # per-sample losses: closure step
                losses, loss = loss, None
        products: CaptureProducts | RowProducts
        mean_gradient: Tensor | None
        edited: Tensor | None = None  # a .grad changed after the backward (clipped, say)
        if capture is not None and losses is None:
            if capture.idle(self._params) and not capture.fusing:
                return loss  # no forward, no gradient: no step (torch.optim's contract)
            products, mean_gradient = self._hooked_products(space, loss_scale)
            if mean_gradient is not None and not capture.grad_is_backward:
                edited, mean_gradient = mean_gradient, None
        else:
            if closure is None:
                raise RuntimeError(
                    f"{self._unattached}; or call step(closure) with a closure that returns "
                    f"the per-sample losses (B,)"
                )
            if self.model is not None:
                check_independent_samples(self.model, dropout=False)
            if capture is not None:
                capture.forget()  # the closure's forward is not a loop's pass
            with torch.enable_grad(), internal_passes():
                losses = closure() if losses is None else losses
                rows = RowProducts.from_losses(space, self._params, losses)
            products = RowProducts(space, all_gather(rows.rows)) if distributed() else rows
            loss = losses.detach().mean()
            mean_gradient = products.rows.mean(0)
            for p, g in zip(self._params, space.unflatten(mean_gradient).values(), strict=True):
                p.grad = g.clone()
        hooked = capture is not None and losses is None
        direction, keep = self._direction(products, mean_gradient, group, edited, hooked)
        if capture is not None and hooked and self.loss_reduction == "sum":
            direction.mul_(capture.samples)  # the summed loss's gradient is N ḡ
        self._apply(space.unflatten(direction), keep)
        return loss

    def _loss_scale(self, closure: Callable[[], Tensor] | None) -> float | None:
        """The loss scale when ``torch.amp.GradScaler.step`` drives this step, else None; 0
        when the scaler found an infinity (the step is skipped).

        The scaler hands the scale and its overflow flag over as the attributes
        ``grad_scale`` and ``found_inf`` (``_step_supports_amp_scaling``, as for
        torch.optim's fused optimizers): the step divides ``.grad`` by the scale in place
        and the captured output gradients with it, so D and the update are those of the
        unscaled loss. The scaler finds overflows in ``.grad``, so a loss-scaled loop is
        never fused."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return None
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            raise InputError(
                "DiffusionMetricSGD unscales its captured output gradients with .grad: call "
                "scaler.step(opt) without scaler.unscale_(opt) before it (the metric step "
                "reads the captures, so clipping .grad would not bound it anyway)"
            )
        if closure is not None:
            raise InputError(
                "a closure step under GradScaler is not supported: use the hooked loop "
                "(scaler.scale(loss).backward(); scaler.step(opt))"
            )
        if float(found_inf):
            return 0.0
        scale = float(grad_scale)
        if self._capture is not None:
            self._capture.unscale(self._params, scale)
        else:
            torch._foreach_mul_([p.grad for p in self._params if p.grad is not None], 1 / scale)
        return scale

    def _direction(
        self,
        products: CaptureProducts | RowProducts,
        mean_gradient: Tensor | None,
        group: dict[str, Any],
        edited: Tensor | None = None,
        hooked: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The step's direction and, with ``sync="device"``, the 0-d mask (1 or 0) of the
        update: 0 where a host-synchronised step would have raised. ``edited``: a ``.grad``
        that was changed after the backward (clipped, a penalty added): the direction is
        then ``g⁻¹`` of it, ``v − (ε/N) Gᵀ w`` with ``c = G v`` by one more JVP, while D
        stays that of the captured per-sample gradients. ``hooked``: the products are a
        hooked loop's, whose samples are the forward's (``zero_gradient_samples``)."""
        D = DiffusionMatrix.from_products(products, mean_gradient=mean_gradient)
        host_sync = self._syncs_with_host(D.space.device)
        policy = Epsilon.parse(group["eps"], group["eps_fraction"])
        matrix_free = self._matrix_free_pays(D, mean_gradient is None, policy, group["inverse"])
        if not matrix_free:
            D.gram()  # built once: it gives λ_max, tr D, the exact solve and c = G ḡ
        left_out = self._samples_left_out(D) if hooked else None
        if left_out is not None and host_sync and bool(left_out):
            raise InputError(SAMPLES_LEFT_OUT)
        metric = DiffusionMetric(
            D,
            policy,
            lambda_tol=LAMBDA_TOL,
            matrix_free=matrix_free,
            sync="host" if host_sync else "device",
            compile=self.compile and not self.capturable,  # the graph takes it all
        )
        self.solver = "matrix-free" if matrix_free else "gram"
        self._stats = {"eps": metric.eps, "trace": D.trace_tensor()}
        if policy.is_auto and host_sync:  # known already; a fixed ε never needs it
            self._stats["lambda_max"] = metric.lambda_max
        elif policy.is_auto:
            self._stats["lambda_max"], self._stats["lambda_bound"] = metric.lambda_bounds
        if edited is None:
            direction = metric.gradient(inverse_of(group["inverse"]), out=self._scratch(D.space))
        else:
            direction = metric.solve(edited, inverse_of(group["inverse"]))
        if metric.status is not None and left_out is not None:
            metric.status = torch.where(left_out, DiffusionMetric.SAMPLES_LEFT_OUT, metric.status)
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

    def _samples_left_out(self, D: DiffusionMatrix) -> Tensor | None:
        """A 0-d bool: some samples have an exactly zero gradient and others not (None
        when ``zero_gradient_samples="keep"``). From the Gram matrix's diagonal where it
        is built, else from the rules' squared norms."""
        if self.zero_gradient_samples == "keep":
            return None
        zero = D.sample_sq_norms() == 0
        return zero.any() & ~zero.all()

    def _matrix_free_pays(
        self, D: DiffusionMatrix, needs_mean: bool, policy: Epsilon, inverse: str
    ) -> bool:
        """Whether the weak step with a fixed ε costs fewer multiply-adds without the Gram
        matrix: ``c = G ḡ`` by one JVP of cost ``P``
        (:meth:`~sgdgeom.persample.PerSampleProducts.costs`; ``2P`` fused, where ``ḡ``
        comes first) against the Gram matrix's. On the 784-784-784-10 MLP (``B in out``
        against ``B²(in + out)`` a layer, fused) it crosses over at ``B ≈ 2 in out / (in +
        out) = 784``. A fixed ε with ``ε tr D ≥ 1`` takes the Gram solver, whose Cholesky
        factorisation checks it: with ``sync="device"`` too, this choice reads ``tr D`` on
        the host, the one host read of such a step (a refusal of an ε that only
        ``ε tr D < 1`` cannot prove would be an error where there is none). A capturable
        step cannot read it: there such an ε is refused (``ε tr D < 1`` is checked on the
        device), and a smaller ε or the uncaptured step takes it.

        ε auto and the exact solve stay on the Gram solver: their matrix-free forms take
        two products per Lanczos or conjugate-gradient step (about 12 and 5–8 steps), and
        products over stored per-sample rows are matrix-vector products, bound by memory
        (``docs/benchmarks/`` has the measurements). They remain available as
        ``DiffusionMetric(..., matrix_free=True)``.
        """
        if policy.is_auto or inverse == "exact":
            return False
        product, gram = D.products.costs()
        if product * (2 if needs_mean else 1) >= gram:
            return False
        return self.capturable or policy.value * D.trace() < 1

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
                update = list(torch._foreach_mul(update, keep))
            torch._foreach_add_(params, update, alpha=-group["lr"])


class _PendingCheck:
    """A device-synchronised step's status code, copied to the host without waiting for
    it; read (and raised) at the next step, when the device has long finished it."""

    def __init__(self, status: Tensor, eps: float | Tensor) -> None:
        self.host = status.to("cpu", non_blocking=True)
        self.eps = eps
        self.event: torch.cuda.Event | None = None
        if status.device.type == "cuda":
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record()

    def raise_if_refused(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        raise_for_status(
            int(self.host), self.eps, "the last step was refused and moved no parameter: "
        )


@register_optimizer("diffusion-metric-sgd")
class DiffusionMetricSGDOptions(OptimizerOptions):
    """:class:`DiffusionMetricSGD` in a config (``eps``, ``inverse``, ``eps_fraction``,
    ``fused``). Old keys read for one release: the name ``diffusion-sgd``, ``mode`` for
    ``inverse``, ``safety`` for ``eps_fraction``, ``fused: true/false``."""

    name: Literal["diffusion-metric-sgd"] = "diffusion-metric-sgd"
    eps: float | Literal["auto"] = "auto"
    inverse: Inverse = "weak"
    eps_fraction: float = Field(0.5, gt=0, lt=1)
    fused: Fused = "auto"

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in (("mode", "inverse"), ("safety", "eps_fraction")):
            if old in data:
                warn(f"optimizer key {old!r}", f"{new!r}", stacklevel=6)
                data.setdefault(new, data.pop(old))
        if isinstance(data.get("fused"), bool):
            data["fused"] = renamed("fused", data["fused"], {True: "on", False: "off"})
        return data

    @model_validator(mode="after")
    def _eps_below_infinity(self) -> DiffusionMetricSGDOptions:
        if isinstance(self.eps, float) and not 0 <= self.eps < float("inf"):
            raise ValueError(f"eps must be 'auto' or a finite number >= 0, got {self.eps}")
        return self

    def alongside(self, loss_is_plain: bool, reads_grad: bool) -> DiffusionMetricSGDOptions:
        """The options beside a config's loss and monitors: the step reads the per-sample
        gradients of one forward and backward, so a loss of several (PLA) is refused; a
        monitor that reads ``.grad`` needs the unfused step (``"auto"`` becomes ``"off"``)."""
        if not loss_is_plain:
            raise ValueError(
                "optimizer diffusion-metric-sgd reads the per-sample gradients of one forward "
                "and backward, and this loss makes several of them: use one or the other"
            )
        if reads_grad and self.fused == "on":
            raise ValueError(
                "optimizer.fused leaves the weights' .grad empty, and a monitor reads it: set "
                "optimizer.fused: off, or switch that monitor off"
            )
        return self.model_copy(update={"fused": "off"}) if reads_grad else self

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return DiffusionMetricSGD(
            model,
            eps=self.eps,
            inverse=self.inverse,
            eps_fraction=self.eps_fraction,
            fused=self.fused,
            **self.sgd_arguments(),
        )


OPTIMIZERS.alias("diffusion-sgd", "diffusion-metric-sgd")
