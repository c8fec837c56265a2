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

- **attached** (pass the model): forward hooks on every ``Linear`` and ``Conv2d`` read the
  layer inputs, tensor hooks the output gradients, of the ordinary
  ``loss = criterion(model(x), y); loss.backward(); opt.step()``. The step then costs one
  weight-gradient-sized product per layer with per-sample coefficients, plus the ``B x B``
  Gram matrix when ``eps="auto"`` or ``mode="exact"``: no second backward, no per-sample
  gradients in memory.

  With ``fused=True`` (models of ``Linear`` layers) that product *replaces* the weight
  gradient: the layers' backward computes input gradients only, so ``.grad`` of their
  weights and biases stays ``None``, and :meth:`step` forms ``∇_D f = Gᵀ(1 − εw)/B``
  directly, with ``c = G ḡ`` from the Gram matrix. The step then costs a plain SGD step
  plus the Gram matrix (``B² x widths`` per layer) and a ``B x B`` problem. Code that reads
  ``.grad`` between ``backward()`` and ``step()`` (gradient clipping, gradient monitors)
  needs ``fused=False``.
- **closure** (any other model): ``step(closure)`` with a closure that returns the
  *per-sample* losses ``(B,)`` with their graph; the per-sample gradients are materialised
  (``B x d``) by one batched backward.

Under ``DistributedDataParallel`` (``torch.distributed`` initialised) the layers' inputs and
output gradients are all-gathered (``B x widths`` per layer, never ``B x d``), so every
process takes the step of the global batch's D (``fused=False`` only: DDP reduces the
``.grad`` that the fused route never makes).

``eps="auto"`` finds ``λ_max`` of the batch by Lanczos on its Gram matrix
(:func:`~sgdgeom.diffusion.top_eigenvalue`, relative residual ``1e-10``), not from the
full spectrum.

.. warning::
    ``weight_decay`` is decoupled: it is added after the metric, ``g⁻¹ ḡ + λ x``, so D
    stays the covariance of the data loss's per-sample gradients. ``eps="auto"``
    recomputes ``ε = safety / λ_max(D_B)`` at every step.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.metric import DiffusionMetric
from sgdgeom.optim.momentum import heavy_ball
from sgdgeom.params import ParamSpace
from sgdgeom.persample import CaptureProducts, CoverageError, Layer, RowProducts, plan_layers
from sgdgeom.persample.layers.conv import ConvRule
from sgdgeom.persample.layers.linear import LinearRule

__all__ = ["DiffusionMetricSGD"]

LAMBDA_TOL = 1e-10  # relative Lanczos residual of λ_max for eps="auto"
_FUSED_DDP = (
    "fused=True does not run under DistributedDataParallel, which all-reduces the .grad "
    "that the fused route never makes: use fused=False"
)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _InputGradientOnlyLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns the input's gradient only: ``fused=True`` leaves
    the weight and bias gradients to :meth:`DiffusionMetricSGD.step`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        return (grad_output @ weight if ctx.needs_input_grad[0] else None), None, None


def _fused_linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and module.training:
        return _InputGradientOnlyLinear.apply(x, module.weight, module.bias)
    return nn.functional.linear(x, module.weight, module.bias)


def _all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` of every process along dim 0 (equal shapes required)."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _attachable_layers(model: nn.Module) -> list[Layer]:
    """The plan of a model whose owner modules are all Linear or Conv1d/Conv2d (the attached
    route), else ``[]`` (the closure route)."""
    try:
        layers = plan_layers(model)
    except CoverageError:
        return []
    if all(isinstance(layer.rule, LinearRule | ConvRule) for layer in layers):
        return layers
    return []


class DiffusionMetricSGD(torch.optim.Optimizer):
    """SGD along the diffusion-metric gradient, with momentum and weight decay.

    Args:
        params: the model (attached route: hooks on its Linear/Conv2d layers), or an
            iterable of parameters (closure route).
        lr: learning rate.
        eps: ``"auto"`` (``safety / λ_max`` of the batch's D) or a number below
            ``1/λ_max``; a step whose batch has ``ε ≥ 1/λ_max`` raises ``ValueError``.
        mode: ``"weak"`` (the paper's ``(I − εD) ḡ``) or ``"exact"`` (``(I + εD)⁻¹ ḡ``).
        safety: the fraction of ``1/λ_max`` that ``"auto"`` uses.
        momentum, dampening, nesterov, weight_decay: as in ``torch.optim.SGD`` (weight decay
            decoupled, see the module warning).
        loss_reduction: ``"mean"`` (the loss is the batch mean of per-sample losses, as
            PyTorch's losses by default) or ``"sum"``; the attached route needs it to turn
            the captured output gradients into per-sample ones.
        fused: compute the metric gradient in place of the Linear layers' weight gradients
            (see the module docstring); ``.grad`` of the model's parameters stays ``None``.

    After each step, ``stats`` holds the batch's ``eps`` and ``trace`` (tr D) and, with
    ``eps="auto"``, the ``lambda_max`` it was derived from.

    Example:
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
        fused: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if mode not in ("weak", "exact"):
            raise ValueError(f"Invalid mode: {mode!r}; choose 'weak' or 'exact'")
        if (isinstance(eps, str) and eps != "auto") or (not isinstance(eps, str) and eps < 0):
            raise ValueError(f"Invalid eps: {eps!r}; use 'auto' or a number >= 0")
        if not 0 < safety < 1:
            raise ValueError(f"Invalid safety: {safety}; it must lie in (0, 1)")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid loss_reduction: {loss_reduction!r}")
        self.model = params if isinstance(params, nn.Module) else None
        self.loss_reduction = loss_reduction
        self.stats: dict[str, float] = {}
        self._layers: list[Layer] = []
        self._captures: dict[nn.Module, dict[str, Tensor | None]] = {}
        self._handles: list[Any] = []
        if self.model is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            self._layers = _attachable_layers(self.model)
        self.fused = fused
        if fused:
            self._check_fusable()
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook))
            if fused:
                layer.module.forward = types.MethodType(_fused_linear_forward, layer.module)
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

    # ------------------------------------------------------------------ hooks

    @property
    def attached(self) -> bool:
        """Whether the step reads per-sample information from hooks (else: closure)."""
        return bool(self._layers)

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (torch.is_grad_enabled() and module.training and output.requires_grad):
            return
        record: dict[str, Tensor | None] = {"input": inputs[0].detach(), "grad": None}
        self._captures[module] = record
        output.register_hook(lambda g: record.__setitem__("grad", g.detach()))

    def _check_fusable(self) -> None:
        if not self.attached:
            raise ValueError(
                "fused=True needs the model itself, made of Linear layers (pass the model, "
                "not its parameters), or use fused=False"
            )
        others = [layer.name for layer in self._layers if not isinstance(layer.rule, LinearRule)]
        if others:
            raise ValueError(
                f"fused=True supports Linear layers only; {others} are not: use fused=False"
            )
        if _distributed():
            raise ValueError(_FUSED_DDP)

    def detach(self) -> None:
        """Remove the hooks from the model (and, if fused, give its layers their forward
        back)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.fused:
            for layer in self._layers:
                layer.module.__dict__.pop("forward", None)

    def _layer_calls(self) -> tuple[list[list[Any]], int]:
        """The calls of every layer since the last step (all-gathered under DDP), as the
        layer rules take them, and the batch size."""
        calls, batch = [], None
        world = torch.distributed.get_world_size() if _distributed() else 1
        for layer in self._layers:
            record = self._captures.get(layer.module)
            if record is None or record["grad"] is None:
                raise RuntimeError(
                    f"DiffusionMetricSGD saw no forward and backward of layer {layer.name!r} "
                    f"since the last step; call loss.backward() on the model's output before "
                    f"step()"
                )
            a, g = record["input"], record["grad"]
            if _distributed():
                a, g = _all_gather(a), _all_gather(g)
            if batch is not None and len(a) != batch:
                raise RuntimeError("the captured layers disagree on the batch size")
            batch = len(a)
            if self.loss_reduction == "mean":  # output grads of the mean loss are 1/B of f_i's
                g = g * (batch // world)
            calls.append([layer.rule.call(layer.module, a, (g,))])
        return calls, batch

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
        group = self.param_groups[0]
        if any(
            g["eps"] != group["eps"] or g["mode"] != group["mode"] or g["safety"] != group["safety"]
            for g in self.param_groups
        ):
            raise ValueError(
                "eps, mode and safety are global to the metric: use the same "
                "values in every param group"
            )
        loss = None
        space = self.space
        if self.attached:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if self.fused:  # no backward since the last step: no step
                if all(record["grad"] is None for record in self._captures.values()):
                    return loss
                if _distributed():
                    raise RuntimeError(_FUSED_DDP)
                mean_gradient = None
            else:
                if all(p.grad is None for p in self._params):
                    return loss
                mean_gradient = self._mean_gradient(space)
            calls, batch = self._layer_calls()
            products = CaptureProducts.from_calls(space, self._layers, calls, batch)
        else:
            if closure is None:
                raise RuntimeError(
                    "this model has layers other than Linear and Conv2d: call "
                    "step(closure) with a closure returning the per-sample losses (B,)"
                )
            with torch.enable_grad():
                losses = closure()
                products = RowProducts.from_losses(space, self._params, losses)
            if _distributed():
                products = RowProducts(space, _all_gather(products.rows))
            loss = losses.detach().mean()
            mean_gradient = products.rows.mean(0)
            for p, g in zip(self._params, space.unflatten(mean_gradient).values(), strict=True):
                p.grad = g.clone()
        self._captures.clear()
        direction = self._direction(products, mean_gradient, group)
        self._apply(space.unflatten(direction))
        return loss

    def _direction(
        self,
        products: CaptureProducts | RowProducts,
        mean_gradient: Tensor | None,
        group: dict[str, Any],
    ) -> Tensor:
        D = DiffusionMatrix.from_products(products, mean_gradient=mean_gradient)
        needs_gram = group["eps"] == "auto" or group["mode"] == "exact" or mean_gradient is None
        if needs_gram:
            D.gram()  # built once: it gives λ_max, tr D, the exact solve and c = G ḡ
        metric = DiffusionMetric(D, group["eps"], group["safety"], lambda_tol=LAMBDA_TOL)
        self.stats = {"eps": metric.eps, "trace": D.trace()}
        if group["eps"] == "auto":  # known already; a fixed ε never needs it
            self.stats["lambda_max"] = metric.lambda_max
        return metric.gradient(exact=group["mode"] == "exact", out=self._scratch(products.space))

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

    def _apply(self, parts: dict[str, Tensor]) -> None:
        steps = iter(parts.values())
        for group in self.param_groups:
            params = group["params"]
            directions = [next(steps) for _ in params]
            states = [self.state[p] for p in params]
            torch._foreach_add_(
                params, heavy_ball(directions, params, group, states), alpha=-group["lr"]
            )
