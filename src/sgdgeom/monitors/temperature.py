r"""Layer temperatures: the training signal and noise of each layer (Musso §2, eq. 2, Fig. 1).

For layer I with weights :math:`\Omega_I` (``N_I`` of them; biases excluded), the training
signal of one minibatch is (M2)

.. math::

    s_I = \frac{1}{N_I} \sum_{\omega \in \Omega_I} |\partial_\omega \mathcal L(W)| ,

and its noise is the standard deviation of :math:`s_I` over the minibatches of an epoch
(Fig. 1, solid and dashed lines). :class:`LayerTemperature` records both, plus the
signal-to-noise ratio of the gradient in the sense of Shwartz-Ziv and Tishby (the norm of
the epoch's mean gradient over the norm of its element-wise standard deviation), and,
optionally, the diffusion matrix's per-layer trace ``tr D_I / N_I`` on a fixed probe set,
the principled temperature of the same layer (``docs/design.md``).

The regimes of Fig. 1 are found in the recorded curves by :mod:`sgdgeom.monitors.regimes`;
the figure is drawn from the JSON-lines metrics by the experiments' plots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from sgdgeom.callbacks import Callback, Loop
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.extras import numba_parallel, numba_threads
from sgdgeom.monitors.probe import ProbeMonitor
from sgdgeom.monitors.registry import MonitorContext, MonitorOptions, register_monitor
from sgdgeom.persample import LossSpec, plan_layers
from sgdgeom.precision import compute_dtype

__all__ = [
    "LayerTemperature",
    "LayerTraces",
    "TemperatureOptions",
    "l1_norms",
    "within_layer_temperatures",
]


def _weighted_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{layer: [(weight name, weight), ...]}``: the layers of the registry
    (:func:`~sgdgeom.persample.plan_layers`, one owner module per parameter) that have
    weights (:meth:`~sgdgeom.persample.Layer.weights`)."""
    out = {}
    for layer in plan_layers(model, allow_shared=True):
        weights = layer.weights()
        if weights:
            out[layer.name] = weights
    return out


_NUMPY_FLOATS = (torch.float32, torch.float64)


@functools.cache
def _l1_kernel(parallel: bool) -> Any:
    """The CPU kernel of :func:`l1_norms`, compiled on first use (``parallel``: over
    threads, :func:`~sgdgeom.extras.numba_parallel`), or None without numba."""
    numba = numba_threads()
    if numba is None:
        return None

    @numba.njit(parallel=parallel, nogil=True, fastmath=True, cache=False)  # type: ignore[untyped-decorator]
    def l1(flat: Any) -> float:  # pragma: no cover - compiled
        total = 0.0  # float64
        for i in numba.prange(flat.size):
            total += abs(flat[i])
        return total

    return l1


def l1_norms(tensors: Sequence[Tensor]) -> Tensor:
    """``‖t‖₁`` of each tensor, ``(len(tensors),)`` in their dtype.

    On the CPU, one pass that only reads: a numba kernel on every thread, summing in
    float64 (torch's L1 reduction is not vectorised there, and ``|t|`` then a sum writes a
    copy: both cost a monitored step more than the read). Without numba, or for a dtype
    numpy lacks (bfloat16, float16), ``|t|`` then a float64 sum: torch's float32 L1
    reduction on one thread is off by 4e-6 (relative) on 90,000 entries, against 1e-8
    rounded from float64, and ``_foreach_norm`` accumulating in float64 is slower (on the
    Fig. 1 net's weights, 2 threads: 2.2 ms against 4.8 ms, and 1.1 ms for the float32
    reduction). Elsewhere, torch's fused ``_foreach_norm``, one kernel for the tensors of
    each device; for a model split over devices the norms are gathered on the first
    tensor's device.
    """
    if not tensors:
        raise InputError("l1_norms needs at least one tensor")
    first = tensors[0]
    if not all(t.device.type == "cpu" for t in tensors):
        norms = torch._foreach_norm(list(tensors), 1)
        return torch.stack([norm.to(first.device) for norm in norms])
    numpy_floats = all(t.dtype in _NUMPY_FLOATS for t in tensors)
    kernel = _l1_kernel(numba_parallel()) if numpy_floats else None
    if kernel is None:
        sums = [t.detach().abs().sum(dtype=torch.float64) for t in tensors]
        return torch.stack(sums).to(first.dtype)
    numba_threads()
    values = [kernel(t.detach().reshape(-1).numpy()) for t in tensors]
    return torch.tensor(values, dtype=first.dtype)


class LayerTemperature(Callback):
    """Records each layer's training signal and noise (M2, Fig. 1) during training.

    A layer is an owner module of the layer registry (:func:`~sgdgeom.persample.plan_layers`),
    and its weights are its trainable parameters that are not biases and have at least two
    dimensions (:meth:`~sgdgeom.persample.Layer.weights`): a Linear's or a convolution's
    weight, an attention module's projection matrices.

    Per minibatch, after backward (:meth:`record`): ``s_I``, the mean absolute gradient of
    layer I's weights. At the end of each epoch (:meth:`epoch_metrics`), for every layer I:

    - ``temperature/I/signal``: the mean of ``s_I`` over the epoch's minibatches;
    - ``temperature/I/noise``: their standard deviation (population, as ``numpy.std``);
    - with ``snr=True``: ``snr/I/mean_norm`` ``‖E_b ∇_I L‖``, ``snr/I/std_norm``
      ``‖Std_b ∇_I L‖`` (element-wise over minibatches b) and ``snr/I/ratio``;
    - every ``trace_every`` epochs (0 = never): ``trace/I``, ``tr D_I / N_I`` of the
      weights, from a :class:`~sgdgeom.diffusion.DiffusionMatrix` of ``loss_fn`` on
      ``probe`` (x, y) (:class:`LayerTraces`, a probe measurement).

    It works as a plain object in any loop (``LayerTemperature(model=model)``, then
    :meth:`record` after each ``backward()`` and :meth:`epoch_metrics` at the end of an
    epoch) and as a callback of :class:`~sgdgeom.train.Trainer` (or, wrapped, of Lightning),
    whose hooks call those.

    Args:
        layers: layer names to monitor; default every layer with weights.
        snr: keep running sums of the gradient and its square: two more passes over the
            weights per step (measured in ``docs/benchmarks/``), so it is off unless asked
            for.
        trace_every: epochs between diffusion-trace measurements.
        probe: a fixed batch ``(x, y)`` for the trace (already normalised).
        loss_fn: the per-sample loss of the trace: the run's own (see
            :func:`~sgdgeom.persample.per_sample_loss`).
        model: the model to monitor now (else: the Trainer's, when training begins).
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        snr: bool = False,
        trace_every: int = 0,
        probe: tuple[Tensor, Tensor] | None = None,
        loss_fn: LossSpec = "cross_entropy",
        model: nn.Module | None = None,
    ) -> None:
        if trace_every < 0:
            raise InputError(f"trace_every must be >= 0, got {trace_every}")
        if trace_every and probe is None:
            raise InputError("trace_every > 0 needs a probe batch (x, y)")
        self.layer_names = list(layers) if layers is not None else None
        self.snr = snr
        self.trace_every = trace_every
        self.probe = probe
        self.loss_fn = loss_fn
        self._traces = (
            LayerTraces(self, probe, loss_fn, trace_every)
            if trace_every and probe is not None
            else None
        )
        self.model: nn.Module | None = None
        self._layers: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._reset()
        if model is not None:
            self.attach(model)

    def _reset(self) -> None:
        self._signals: list[Tensor] = []
        self._sums: list[Tensor] = []
        self._squares: list[Tensor] = []
        self._count = 0

    @property
    def layers(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The monitored layers' weights, ``{layer: [(name, weight), ...]}`` (empty before
        :meth:`attach`)."""
        return self._layers

    def attach(self, model: nn.Module) -> None:
        """Monitor ``model`` from now on (and forget what was recorded)."""
        available = _weighted_layers(model)
        if not available:
            raise InputError("the model has no layer with trainable weights to monitor")
        if self.layer_names is None:
            self._layers = available
        else:
            missing = [n for n in self.layer_names if n not in available]
            if missing:
                raise InputError(
                    f"no weight layers named {missing}; the model's are {', '.join(available)}"
                )
            self._layers = {n: available[n] for n in self.layer_names}
        self.model = model
        self._weights = [(n, w) for pairs in self._layers.values() for n, w in pairs]
        first = self._weights[0][1]
        self._owner = torch.tensor(
            [k for k, pairs in enumerate(self._layers.values()) for _ in pairs],
            device=first.device,
        )
        self._numels = torch.tensor(
            [sum(w.numel() for _, w in pairs) for pairs in self._layers.values()],
            dtype=compute_dtype(first.dtype),  # float32 for bfloat16 weights
            device=first.device,
        )
        self._reset()

    def record(self) -> None:
        """Read the gradients of the minibatch just backpropagated."""
        if self.model is None:
            raise RuntimeError("LayerTemperature: attach(model) first (or pass model=)")
        missing = [n for n, w in self._weights if w.grad is None]
        if missing:
            raise RuntimeError(
                f"LayerTemperature found no gradient of {missing} after backward(): call it "
                f"after loss.backward(); an optimizer that fuses the weight gradients away "
                f"(DiffusionMetricSGD's default) needs fused='off' beside this monitor"
            )
        grads = [w.grad for _, w in self._weights if w.grad is not None]
        norms = l1_norms(grads).to(self._numels.dtype)
        if len(norms) != len(self._numels):  # a layer with several weight tensors
            norms = torch.zeros_like(self._numels).index_add_(0, self._owner, norms)
        self._signals.append(norms / self._numels)
        if self.snr:
            if not self._sums:
                self._sums = [torch.zeros_like(g, dtype=self._numels.dtype) for g in grads]
                self._squares = [torch.zeros_like(g, dtype=self._numels.dtype) for g in grads]
            torch._foreach_add_(self._sums, grads)
            torch._foreach_addcmul_(self._squares, grads, grads)
        self._count += 1

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """The epoch's metrics (see the class doc), and a fresh start for the next."""
        metrics: dict[str, float] = {}
        if self._count == 0:
            return metrics
        signals = torch.stack(self._signals).double().cpu().numpy()  # (batches, layers)
        mean, std = signals.mean(0), signals.std(0)
        for name, m, sd in zip(self._layers, mean, std, strict=True):
            metrics[f"temperature/{name}/signal"] = float(m)
            metrics[f"temperature/{name}/noise"] = float(sd)
        if self.snr:
            mean_sq = dict.fromkeys(self._layers, 0.0)
            std_sq = dict.fromkeys(self._layers, 0.0)
            owners = [layer for layer, pairs in self._layers.items() for _ in pairs]
            for layer, total, square in zip(owners, self._sums, self._squares, strict=True):
                g_mean = total / self._count
                g_std = (square / self._count - g_mean.square()).clamp_min(0).sqrt()
                mean_sq[layer] += float(g_mean.square().sum())
                std_sq[layer] += float(g_std.square().sum())
            for name in self._layers:
                mean_norm, std_norm = math.sqrt(mean_sq[name]), math.sqrt(std_sq[name])
                metrics[f"snr/{name}/mean_norm"] = mean_norm
                metrics[f"snr/{name}/std_norm"] = std_norm
                metrics[f"snr/{name}/ratio"] = mean_norm / std_norm if std_norm > 0 else math.inf
        if self._traces is not None and self._traces.due(epoch):
            assert self.model is not None
            metrics.update(self._traces.measure_now(self.model))
        self._reset()
        return metrics

    # ------------------------------------------------------------------ Trainer callback

    def on_train_begin(self, trainer: Loop) -> None:
        self.attach(trainer.model)

    def on_after_backward(self, trainer: Loop, x: Tensor, y: Tensor, loss: Tensor) -> None:
        self.record()

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        metrics.update(self.epoch_metrics(epoch))


def within_layer_temperatures(
    model: nn.Module,
    loss_fn: LossSpec,
    data: tuple[Tensor, Tensor],
    layers: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    r"""Musso's footnote 7: do the weights of one layer share a temperature?

    A weight's own temperature is its gradient-noise variance :math:`D_{\omega\omega}`
    over the samples (the diagonal of D). For every layer I with weights (as
    :class:`LayerTemperature`; default all), over :math:`\omega \in \Omega_I`:

    - ``q10``, ``q50``, ``q90``: quantiles of :math:`D_{\omega\omega}` and ``ratio_90_10``;
    - ``zero_fraction``: weights whose variance is exactly 0 (dead units);
    - ``split_half_correlation``: the Pearson correlation of :math:`\log D_{\omega\omega}`
      measured on the even and on the odd samples (weights with a nonzero variance in
      both). Under a common temperature the weights' differences are sampling noise,
      independent between the halves: a correlation near 0 (within about
      :math:`1/\sqrt{N_I}`); a correlation near 1 says they belong to the weights;
    - ``numel``: :math:`N_I`.

    ``data`` is one batch ``(x, y)`` of at least 4 samples; the model is not changed.
    """
    x, y = data
    if len(x) < 4:
        raise InputError(f"within_layer_temperatures needs at least 4 samples, got {len(x)}")
    chosen = _weighted_layers(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(chosen))
        if unknown:
            raise InputError(f"no layer with weights named {unknown}; the layers: {list(chosen)}")
        chosen = {name: chosen[name] for name in layers}
    # two captures, one per half; the whole batch's diagonal from the halves' sums:
    # (1/N) Σ_i g_i² − ḡ², with Σ_i g_i² and Σ_i g_i the halves' added
    halves = [
        DiffusionMatrix(model, loss_fn, (x[part], y[part]), chunk_size=256)
        for part in (slice(0, None, 2), slice(1, None, 2))
    ]
    even_half, odd_half = halves
    total = even_half.n + odd_half.n
    mean = (even_half.n * even_half.mean_gradient() + odd_half.n * odd_half.mean_gradient()) / total
    second = (even_half.products.square_sum() + odd_half.products.square_sum()) / total
    diagonals = [
        even_half.space.unflatten(diagonal)
        for diagonal in ((second - mean.square()).clamp_min(0), *(h.diagonal() for h in halves))
    ]
    out = {}
    for layer, weights in chosen.items():
        whole, even, odd = (
            torch.cat([d[n].reshape(-1) for n, _ in weights]).double() for d in diagonals
        )
        # numpy's quantile: torch's refuses more than 2²⁴ entries (a 4096 x 4096 layer)
        q10, q50, q90 = np.quantile(whole.cpu().numpy(), [0.1, 0.5, 0.9])
        live = (even > 0) & (odd > 0)
        if int(live.sum()) >= 3:
            pair = torch.stack([even[live].log(), odd[live].log()])
            correlation = float(torch.corrcoef(pair)[0, 1])
        else:
            correlation = math.nan
        out[layer] = {
            "q10": float(q10),
            "q50": float(q50),
            "q90": float(q90),
            "ratio_90_10": float(q90 / q10) if q10 > 0 else math.inf,
            "zero_fraction": float((whole == 0).double().mean()),
            "split_half_correlation": correlation,
            "numel": len(whole),
        }
    return out


class LayerTraces(ProbeMonitor):
    """``trace/I = tr D_I / N_I`` over the weights of a :class:`LayerTemperature`'s layers,
    from the diffusion matrix of the probe batch: the temperature part of the monitor that
    is a probe measurement (:class:`~sgdgeom.monitors.probe.ProbeMonitor`)."""

    def __init__(
        self,
        owner: LayerTemperature,
        probe: tuple[Tensor, Tensor],
        loss_fn: LossSpec,
        every: int,
    ) -> None:
        super().__init__(probe, loss_fn, every)
        self.owner = owner

    def measure(
        self, model: nn.Module, data: tuple[Tensor, Tensor], trainer: Loop | None
    ) -> dict[str, float]:
        traces = DiffusionMatrix(model, self.loss_fn, data, chunk_size=256).param_traces()
        return {
            f"trace/{layer}": sum(traces[n] for n, _ in pairs) / sum(w.numel() for _, w in pairs)
            for layer, pairs in self.owner.layers.items()
        }


@register_monitor("temperature")
class TemperatureOptions(MonitorOptions):
    """:class:`LayerTemperature` in a config: ``snr``, ``trace_every`` (on the probe batch)
    and ``layers`` (default: every layer with weights)."""

    reads_grad: ClassVar[bool] = True
    report: ClassVar[str | None] = "temperature"

    snr: bool = False
    trace_every: int = Field(0, ge=0)
    layers: list[str] | None = None

    def build(self, context: MonitorContext) -> Callback:
        return LayerTemperature(
            self.layers,
            snr=self.snr,
            trace_every=self.trace_every,
            probe=context.probe,
            loss_fn=context.loss_fn,
        )
