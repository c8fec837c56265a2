"""The training regimes of Musso's Fig. 1, found in the layer temperatures a run recorded.

:func:`temperature_curves` reads the per-layer signal and noise of
:class:`~sgdgeom.monitors.temperature.LayerTemperature` back from a run's metrics records;
:func:`analyse_regimes` finds the regimes in them and fits the late-time decay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sgdgeom.errors import InputError

__all__ = ["PREFIXES", "analyse_regimes", "temperature_curves"]


PREFIXES = ("temperature/", "temp/")
"""The key prefixes of the layer temperatures: today's, and that of runs recorded before
the vocabulary was made one (still read)."""


def temperature_curves(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer signal and noise arrays from metrics records (``metrics.jsonl``)."""
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for r in records for k in r)), None)
    if prefix is None:
        raise InputError("no temperature metrics (temperature/...) in these records")
    rows = [r for r in records if any(k.startswith(prefix) for k in r)]
    layers = [k.split("/")[1] for k in rows[0] if k.startswith(prefix) and k.endswith("/signal")]

    def column(key: str) -> np.ndarray:
        try:
            return np.array([np.nan if r[key] is None else float(r[key]) for r in rows])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"a temperature record lacks a number for {key}") from None

    curves = {
        "epochs": column("epoch"),
        "signal": {n: column(f"{prefix}{n}/signal") for n in layers},
        "noise": {n: column(f"{prefix}{n}/noise") for n in layers},
    }
    if all(f"snr/{n}/ratio" in r for n in layers for r in rows):
        curves["snr"] = {n: column(f"snr/{n}/ratio") for n in layers}
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
       paper's dashed lines reach its solid ones, :math:`\ell_n \ge \ell_s` (the noise of
       the training signal, its standard deviation over an epoch's minibatches, at or above
       the signal itself: the paper's Fig. 1 criterion). With ``snr`` (``‖E g_I‖ / ‖Std
       g_I‖`` per layer, Shwartz-Ziv and Tishby's gradient criterion, which the paper cites
       but does not draw) ``t_cross_snr`` is the first epoch whose layer-averaged log ratio
       is at or below 0, reported beside it;
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
    crossed = np.nonzero(mean_n >= mean_s)[0]
    cross = int(crossed[0]) if len(crossed) else None
    start = max(peak, cross if cross is not None else peak)
    dropped = np.nonzero((mean_s <= mean_s[peak] - late_drop) & (np.arange(len(t)) >= start))[0]
    late = int(dropped[0]) if len(dropped) else None
    out: dict[str, Any] = {
        "t_peak": float(t[peak]),
        "t_cross": float(t[cross]) if cross is not None else None,
        "t_late": float(t[late]) if late is not None else None,
        # the smallest layer-averaged log noise-to-signal gap, ℓ_n − ℓ_s: how near the
        # dashed lines came to the solid ones where they never cross
        "closest_log_gap": float((mean_n - mean_s).max()),
        "layers": {},
    }
    if snr is not None:
        ratios = np.stack([np.log(np.asarray(snr[n], dtype=float)) for n in names])
        snr_crossed = np.nonzero(_smooth(ratios.mean(0), smooth) <= 0)[0]
        out["t_cross_snr"] = float(t[snr_crossed[0]]) if len(snr_crossed) else None
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
