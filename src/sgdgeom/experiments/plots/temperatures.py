"""Musso's Fig. 1 of one run, from its metrics records alone: the layer temperatures with
the regimes that :mod:`sgdgeom.monitors.regimes` finds in them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.experiments.plots.common import pyplot
from sgdgeom.files import save_figure
from sgdgeom.monitors.regimes import temperature_curves

__all__ = ["plot_temperatures"]


def plot_temperatures(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    analysis: dict[str, Any] | None = None,
    title: str = "",
) -> Path:
    """Fig. 1 of Musso: natural log of the signal (solid) and its standard deviation
    (dashed) per layer against epochs, one colour per layer, regimes shaded (by the paper's
    criterion, :func:`~sgdgeom.monitors.regimes.analyse_regimes`); with the gradient SNR,
    a second panel with its crossing dashed."""
    plt = pyplot()
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
        late = analysis.get("t_late") or t[-1]
        cross = analysis.get("t_cross")  # None: the dashed lines never reach the solid ones
        bounds = [t[0], late if cross is None else cross, late, t[-1]]
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
        if analysis is not None and analysis.get("t_cross_snr"):
            right.axvline(analysis["t_cross_snr"], color="k", lw=0.8, ls="--")
        right.set_xscale("log")
        right.set_xlabel("epoch")
        right.set_ylabel("log ‖E g_I‖ / ‖Std g_I‖")
        right.set_title("gradient signal-to-noise (above 0: signal-dominated)")
        right.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)
