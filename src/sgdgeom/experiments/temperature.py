"""Musso's Fig. 1 and the regime analysis of one run, from its ``metrics.jsonl``: the report
of a run trained with the temperature monitor (``sgdgeom temperature RUN_DIR``; the
trainer writes it at the end of such a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sgdgeom.errors import SgdgeomError
from sgdgeom.experiments.kinds import KINDS, ExperimentKind, RunContext, register_kind
from sgdgeom.experiments.plots.temperatures import plot_temperatures
from sgdgeom.files import atomic_write_bytes, read_jsonl
from sgdgeom.monitors.regimes import analyse_regimes, temperature_curves
from sgdgeom.train import METRICS

__all__ = ["KIND", "TemperatureConfig", "write_temperature_report"]


def write_temperature_report(run_dir: str | Path, title: str = "") -> dict[str, Any]:
    """``regimes.json`` and ``temperatures.png`` (Musso Fig. 1) from ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / METRICS)
    curves = temperature_curves(records)
    analysis = analyse_regimes(
        curves["epochs"], curves["signal"], curves["noise"], snr=curves.get("snr")
    )
    atomic_write_bytes(run_dir / "regimes.json", json.dumps(analysis, indent=2).encode())
    plot_temperatures(records, run_dir / "temperatures.png", analysis, title=title)
    return analysis


class TemperatureConfig(BaseModel):
    """The options of ``sgdgeom temperature``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path = Field(
        description="A run directory trained with the temperature monitor.",
        json_schema_extra={"positional": True},
    )


def _run(config: TemperatureConfig, context: RunContext) -> dict[str, Any]:
    run_dir = config.run_dir
    if not (run_dir / METRICS).is_file():
        raise SgdgeomError(
            f"{run_dir} has no {METRICS}: train it with `monitor: {{temperature: true}}` first"
        )
    try:
        analysis = write_temperature_report(run_dir, title=run_dir.name)
    except ValueError as err:
        raise SgdgeomError(
            f"{run_dir}: {err}; train it with `monitor: {{temperature: true}}`"
        ) from None
    return {
        **analysis,
        "written": [str(run_dir / "regimes.json"), str(run_dir / "temperatures.png")],
    }


def _summary(analysis: dict[str, Any]) -> str:
    shown = {k: v for k, v in analysis.items() if k != "written"}
    return json.dumps(shown, indent=2) + f"\nwrote {' and '.join(analysis['written'])}"


def _plots(run_dir: Path) -> list[Path]:
    analysis = json.loads((run_dir / "regimes.json").read_text())
    records = read_jsonl(run_dir / METRICS)
    return [plot_temperatures(records, run_dir / "temperatures.png", analysis, title=run_dir.name)]


KIND = register_kind(
    ExperimentKind(
        name="temperature",
        help="The layer temperatures of a run as Musso's Figure 1, with the regime analysis, "
        "from its metrics.jsonl "
        "(regimes.json, temperatures.png in the run directory).",
        config=TemperatureConfig,
        run=_run,
        summary=_summary,
        plots=_plots,
        source="options",
        out=None,
    )
)
KINDS.alias("temperatures", "temperature")
