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
the principled temperature of the same layer (DESIGN §1).

:func:`analyse_regimes` finds Fig. 1's three regimes in the recorded curves and fits the
late-time decay; :func:`plot_temperatures` draws Fig. 1 from the JSON-lines metrics alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgdgeom.errors import InputError
from sgdgeom.extras import numba_threads
from sgdgeom.files import save_figure
from sgdgeom.persample import LossSpec, plan_layers
from sgdgeom.train import Callback, Trainer

__all__ = ["LayerTemperature", "analyse_regimes", "plot_temperatures", "temperature_curves"]


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
def _l1_kernel() -> Any:
    """The CPU kernel of :func:`l1_norms`, compiled on first use, or None without numba."""
    numba = numba_threads()
    if numba is None:
        return None

    @numba.njit(parallel=True, nogil=True, fastmath=True, cache=False)
    def l1(flat: Any) -> float:  # pragma: no cover - compiled
        total = 0.0  # float64
        for i in numba.prange(flat.size):
            total += abs(flat[i])
        return total

    return l1


def l1_norms(tensors: Sequence[Tensor]) -> Tensor:
    """``‖t‖₁`` of each tensor, ``(len(tensors),)`` in their dtype.

    One pass that only reads: on the CPU a numba kernel on every thread, summing in float64
    (torch's L1 reduction is not vectorised there, and ``|t|`` then a sum writes a copy:
    both cost a monitored step more than the read, ``benchmarks/monitor.py``); elsewhere,
    or without numba, torch's fused ``_foreach_norm``, one kernel for all tensors.
    """
    if not tensors:
        raise InputError("l1_norms needs at least one tensor")
    first = tensors[0]
    on_cpu = all(t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS for t in tensors)
    kernel = _l1_kernel() if on_cpu else None
    if kernel is None:
        return torch.stack(torch._foreach_norm(list(tensors), 1))
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

    - ``temp/I/signal``: the mean of ``s_I`` over the epoch's minibatches;
    - ``temp/I/noise``: their standard deviation (population, as ``numpy.std``);
    - with ``snr=True``: ``snr/I/mean_norm`` ``‖E_b ∇_I L‖``, ``snr/I/std_norm``
      ``‖Std_b ∇_I L‖`` (element-wise over minibatches b) and ``snr/I/ratio``;
    - every ``trace_every`` epochs (0 = never): ``trace/I``, ``tr D_I / N_I`` of the
      weights, from a :class:`~sgdgeom.diffusion.DiffusionMatrix` of ``loss_fn`` on
      ``probe`` (x, y).

    It works as a plain object in any loop (``LayerTemperature(model=model)``, then
    :meth:`record` after each ``backward()`` and :meth:`epoch_metrics` at the end of an
    epoch) and as a :class:`~sgdgeom.train.Trainer` callback, whose hooks call those.

    Args:
        layers: layer names to monitor; default every layer with weights.
        snr: keep running sums of the gradient and its square: two more passes over the
            weights per step (``benchmarks/monitor.py``: about 10% of a small step more),
            so it is off unless asked for.
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
            dtype=first.dtype,
            device=first.device,
        )
        self._reset()

    def record(self) -> None:
        """Read the gradients of the minibatch just backpropagated."""
        if self.model is None:
            raise RuntimeError("LayerTemperature: attach(model) first (or pass model=)")
        grads = [w.grad for _, w in self._weights]
        missing = [n for (n, _), g in zip(self._weights, grads, strict=True) if g is None]
        if missing:
            raise RuntimeError(
                f"LayerTemperature found no gradient of {missing} after backward(): call it "
                f"after loss.backward(); an optimizer that fuses the weight gradients away "
                f"(DiffusionMetricSGD's default) needs fused=False beside this monitor"
            )
        norms = l1_norms(grads)
        if len(norms) != len(self._numels):  # a layer with several weight tensors
            norms = torch.zeros_like(self._numels).index_add_(0, self._owner, norms)
        self._signals.append(norms / self._numels)
        if self.snr:
            if not self._sums:
                self._sums = [torch.zeros_like(g) for g in grads]
                self._squares = [torch.zeros_like(g) for g in grads]
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
            metrics[f"temp/{name}/signal"] = float(m)
            metrics[f"temp/{name}/noise"] = float(sd)
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
        if self.trace_every and epoch % self.trace_every == 0:
            metrics.update(self._traces(self.model))
        self._reset()
        return metrics

    # ------------------------------------------------------------------ Trainer callback

    def on_train_begin(self, trainer: Trainer) -> None:
        self.attach(trainer.model)

    def on_after_backward(self, trainer: Trainer, x: Tensor, y: Tensor, loss: Tensor) -> None:
        self.record()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        metrics.update(self.epoch_metrics(epoch))

    def _traces(self, model: nn.Module) -> dict[str, float]:
        from sgdgeom.diffusion import DiffusionMatrix

        if self.probe is None:
            return {}
        x, y = self.probe
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            probe = (x.to(device), y.to(device))
            traces = DiffusionMatrix(model, self.loss_fn, probe, chunk_size=256).param_traces()
        finally:
            model.train(was_training)
        return {
            f"trace/{layer}": sum(traces[n] for n, _ in pairs) / sum(w.numel() for _, w in pairs)
            for layer, pairs in self._layers.items()
        }


# --------------------------------------------------------------------------- analysis


def temperature_curves(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer signal and noise arrays from metrics records (``metrics.jsonl``)."""
    rows = [r for r in records if any(k.startswith("temp/") for k in r)]
    if not rows:
        raise InputError("no temperature metrics (temp/...) in these records")
    layers = [k.split("/")[1] for k in rows[0] if k.startswith("temp/") and k.endswith("/signal")]
    curves = {
        "epochs": np.array([r["epoch"] for r in rows], dtype=float),
        "signal": {n: np.array([r[f"temp/{n}/signal"] for r in rows]) for n in layers},
        "noise": {n: np.array([r[f"temp/{n}/noise"] for r in rows]) for n in layers},
    }
    if all(f"snr/{n}/ratio" in r for n in layers for r in rows):
        curves["snr"] = {n: np.array([r[f"snr/{n}/ratio"] for r in rows]) for n in layers}
    return curves


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def analyse_regimes(
    epochs: Sequence[float],
    signal: dict[str, Sequence[float]],
    noise: dict[str, Sequence[float]],
    *,
    snr: dict[str, Sequence[float]] | None = None,
    smooth: int = 3,
    late_drop: float = 1.0,
) -> dict[str, Any]:
    r"""The regimes of Musso's Fig. 1 and the late-time decay of every layer.

    The paper names the regimes but gives no formula; this is the operational definition,
    applied to the layer-averaged natural-log curves :math:`\ell_s(t) = \langle \log s_I
    \rangle_I` and :math:`\ell_n(t) = \langle \log \sigma_I \rangle_I`, each smoothed by a
    moving average of ``smooth`` epochs:

    1. *signal-dominated*: from the start until ``t_cross``, the first epoch at which the
       gradient becomes noise-dominated: with ``snr`` (``‖E g_I‖ / ‖Std g_I‖`` per layer,
       Shwartz-Ziv and Tishby's criterion) the first epoch whose layer-averaged log ratio
       is at or below 0; without it, the first with :math:`\ell_n \ge \ell_s`;
    2. *transition*: from ``t_cross`` to ``t_late``; the paper places it at the signal's
       maximum ``t_peak`` (reported too);
    3. *late, noise-dominated*: from ``t_late``, the first epoch after
       ``max(t_peak, t_cross)`` at which :math:`\ell_s` has fallen ``late_drop`` nats below
       its maximum.

    In the late regime every layer's log-signal and log-noise are fitted against log time,
    :math:`\log s_I = a_I + b_I \log t` (a power law, i.e. sub-exponential decay), and
    against time, :math:`\log s_I = a_I + b_I t` (exponential). The common-decay test of the
    paper ("the layers' log-curves differ only by constants") is ``common_decay_residual``:
    the RMS over late epochs of the across-layer spread of :math:`\log s_I - \overline{\log
    s_I}` (each layer's late mean removed), relative to the RMS variation of
    :math:`\ell_s` over the same epochs: near 0 means a common decay.
    """
    t = np.asarray(epochs, dtype=float)
    names = list(signal)
    log_s = np.stack([np.log(np.asarray(signal[n], dtype=float)) for n in names])
    log_n = np.stack([np.log(np.maximum(np.asarray(noise[n], dtype=float), 1e-300)) for n in names])
    mean_s, mean_n = _smooth(log_s.mean(0), smooth), _smooth(log_n.mean(0), smooth)
    peak = int(np.argmax(mean_s))
    if snr is not None:
        ratios = np.stack([np.log(np.asarray(snr[n], dtype=float)) for n in names])
        crossed = np.nonzero(_smooth(ratios.mean(0), smooth) <= 0)[0]
    else:
        crossed = np.nonzero(mean_n >= mean_s)[0]
    cross = int(crossed[0]) if len(crossed) else None
    start = max(peak, cross if cross is not None else peak)
    dropped = np.nonzero((mean_s <= mean_s[peak] - late_drop) & (np.arange(len(t)) >= start))[0]
    late = int(dropped[0]) if len(dropped) else None
    out: dict[str, Any] = {
        "t_peak": float(t[peak]),
        "t_cross": float(t[cross]) if cross is not None else None,
        "t_late": float(t[late]) if late is not None else None,
        "layers": {},
    }
    if late is None or len(t) - late < 3:
        out["note"] = "no late regime of at least 3 epochs: train longer"
        return out
    window = slice(late, None)
    log_t = np.log(t[window])
    for i, name in enumerate(names):
        fits = {}
        for label, curve in (("signal", log_s[i, window]), ("noise", log_n[i, window])):
            fits[f"{label}_powerlaw_slope"] = float(np.polyfit(log_t, curve, 1)[0])
            fits[f"{label}_exponential_rate"] = float(np.polyfit(t[window], curve, 1)[0])
        out["layers"][name] = fits
    slopes = np.array([f["signal_powerlaw_slope"] for f in out["layers"].values()])
    out["signal_slope_mean"] = float(slopes.mean())
    out["signal_slope_spread"] = float(slopes.std())
    centred = log_s[:, window] - log_s[:, window].mean(1, keepdims=True)
    spread = np.sqrt(np.mean(centred.std(0) ** 2))
    variation = np.sqrt(np.mean((log_s.mean(0)[window] - log_s.mean(0)[window].mean()) ** 2))
    out["common_decay_residual"] = float(spread / variation) if variation > 0 else None
    return out


def plot_temperatures(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    analysis: dict[str, Any] | None = None,
    title: str = "",
) -> Path:
    """Fig. 1 of Musso: natural log of the signal (solid) and its standard deviation
    (dashed) per layer against epochs, one colour per layer, regimes shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = temperature_curves(records)
    t = curves["epochs"]
    with_snr = "snr" in curves
    fig, axes = plt.subplots(
        1, 2 if with_snr else 1, figsize=(13 if with_snr else 8, 4.5), squeeze=False
    )
    ax = axes[0, 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(curves["signal"]):
        c = colours[i % len(colours)]
        ax.plot(t, np.log(curves["signal"][name]), color=c, lw=1.4, label=f"{name} signal")
        ax.plot(t, np.log(np.maximum(curves["noise"][name], 1e-300)), color=c, lw=1.0, ls="--")
    if analysis is not None:
        bounds = [t[0], analysis.get("t_cross") or t[0], analysis.get("t_late") or t[-1], t[-1]]
        shades = [
            ("signal-dominated", "tab:green"),
            ("transition", "tab:orange"),
            ("late, noise-dominated", "tab:grey"),
        ]
        for (label, colour), lo, hi in zip(shades, bounds, bounds[1:], strict=False):
            if hi > lo:
                ax.axvspan(lo, hi, color=colour, alpha=0.08, label=label)
        ax.axvline(analysis["t_peak"], color="k", lw=0.8, ls=":", label="signal maximum")
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("log s_I (solid), log std s_I (dashed)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    if with_snr:
        right = axes[0, 1]
        for i, name in enumerate(curves["snr"]):
            right.plot(t, np.log(curves["snr"][name]), color=colours[i % len(colours)], label=name)
        right.axhline(0, color="k", lw=0.8)
        if analysis is not None and analysis.get("t_cross"):
            right.axvline(analysis["t_cross"], color="k", lw=0.8, ls="--")
        right.set_xscale("log")
        right.set_xlabel("epoch")
        right.set_ylabel("log ‖E g_I‖ / ‖Std g_I‖")
        right.set_title("gradient signal-to-noise (above 0: signal-dominated)")
        right.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)
