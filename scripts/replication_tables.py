"""The tables of docs/replication.md, from the result stores of the replication sweeps.

Run: ``python scripts/replication_tables.py runs/replication [--json OUT.json]`` (the report
keeps its tables in ``docs/benchmarks/replication.json``).

Every sweep folder under the argument (``*/results.sqlite``, written by ``sgdgeom sweep
configs/replication/*.yaml``) gives one table: one row per group of runs (the labels
without the seed), with the number of finished runs and, over them, mean ± standard error
of the best and final test accuracy and of the final test loss, and the wall-clock seconds
per epoch. Runs with a ``regimes.json`` (Musso Fig. 1) add the epochs of the regimes. A
sweep over ``optimizer.lr`` adds a table of each variant at its best learning rate (by mean
best test accuracy; ↑ or ↓ where that is the grid's largest or smallest).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from sgdgeom.experiments.plots import group_label, mean_and_error
from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import save_figure

METRICS = ("best_test_acc", "final_test_acc", "final_test_loss")


def summarise(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """``{group: {metric: [mean, s.e.], "runs": n, "seconds_per_epoch": s, ...}}``."""
    store = ResultStore(sweep_dir / "results.sqlite")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in store.runs():
        if run["status"] == "finished":
            groups[group_label(run["labels"])].append(run)
    table = {}
    for name, runs in sorted(groups.items()):
        labels = {k: v for k, v in runs[0]["labels"].items() if k != "seed"}
        row: dict[str, Any] = {"runs": len(runs), "labels": labels}
        for metric in METRICS:
            mean, error = mean_and_error([run["final"][metric] for run in runs])
            row[metric] = [float(mean), float(error)]
        seconds = [e["seconds"] for run in runs for e in store.epochs(run["hash"])]
        row["seconds_per_epoch"] = sum(seconds) / len(seconds)
        regimes = [sweep_dir / "runs" / run["name"] / "regimes.json" for run in runs]
        if all(path.exists() for path in regimes):
            found = [json.loads(path.read_text()) for path in regimes]
            for key in ("t_cross", "t_peak", "t_late"):
                values = [f[key] for f in found if f[key] is not None]
                row[key] = [float(v) for v in mean_and_error(values)] if values else None
                row[f"{key}_runs"] = len(values)
        table[name] = row
    return table


def markdown(title: str, table: dict[str, dict[str, Any]]) -> str:
    def cell(value: list[float] | None, digits: int = 4) -> str:
        return "—" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    lines = [
        f"\n{title}\n",
        "| group | runs | best test acc | final test acc | final test loss | s / epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['runs']} | {cell(row['best_test_acc'])} | "
            f"{cell(row['final_test_acc'])} | {cell(row['final_test_loss'])} | "
            f"{row['seconds_per_epoch']:.2f} |"
        )
        if "t_cross" in row:
            lines.append(
                f"| {name}: regimes (epochs) | | t_cross {cell(row['t_cross'], 0)} | "
                f"t_peak {cell(row['t_peak'], 0)} | t_late {cell(row['t_late'], 0)} | |"
            )
    return "\n".join(lines)


def best_learning_rates(table: dict[str, dict[str, Any]]) -> str:
    """Each variant at its best ``optimizer.lr``, as a markdown table ("" without a grid)."""
    by_variant: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for row in table.values():
        if "optimizer.lr" in row["labels"]:
            by_variant[row["labels"]["variant"]][float(row["labels"]["optimizer.lr"])] = row
    if not by_variant:
        return ""
    lines = [
        "| optimizer | lr grid | best lr | runs | best test acc | final test acc "
        "| final test loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ranked = sorted(
        by_variant.items(),
        key=lambda item: -max(r["best_test_acc"][0] for r in item[1].values()),
    )
    for variant, rows in ranked:
        grid = sorted(rows)
        lr = max(grid, key=lambda v: rows[v]["best_test_acc"][0])
        edge = " ↑" if lr == grid[-1] else " ↓" if lr == grid[0] else ""
        row = rows[lr]
        cells = [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in METRICS]
        lines.append(
            f"| {variant} | {', '.join(f'{v:g}' for v in grid)} | {lr:g}{edge} | "
            f"{row['runs']} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def plot_learning_rates(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Best test accuracy of every optimizer at each point of its lr grid (low, middle,
    high), mean ± s.e. bars, the axis zoomed to the bars' range (differences of a few
    tenths of a percent are the point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_variant: dict[str, dict[float, list[float]]] = defaultdict(dict)
    for row in table.values():
        if "optimizer.lr" in row["labels"]:
            lr = float(row["labels"]["optimizer.lr"])
            by_variant[row["labels"]["variant"]][lr] = row["best_test_acc"]
    names = sorted(by_variant, key=lambda v: -max(m for m, _ in by_variant[v].values()))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(grid) for grid in by_variant.values())
    lows, highs = [], []
    for i, name in enumerate(names):
        for j, lr in enumerate(sorted(by_variant[name])):
            mean, error = by_variant[name][lr]
            ax.bar(i + (j - 1) * width, mean, width, yerr=error, capsize=2,
                   color=plt.cm.viridis(0.15 + 0.35 * j), label=("low", "middle", "high")[j]
                   if i == 0 else None)  # fmt: skip
            ax.text(i + (j - 1) * width, mean + error, f"{lr:g}", ha="center", va="bottom",
                    fontsize=6, rotation=90)  # fmt: skip
            lows.append(mean - error)
            highs.append(mean + error)
    ax.set_ylim(min(lows) - 0.005, max(highs) + 0.012)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("best test accuracy")
    ax.set_title(f"{title}: each optimizer over its lr grid (mean ± s.e. over seeds)")
    ax.legend(title="lr in the grid", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding one folder per sweep")
    parser.add_argument("--json", type=Path, help="write every table here too")
    parser.add_argument(
        "--figures", type=Path, help="draw each lr-grid sweep's bars into this folder"
    )
    args = parser.parse_args()
    sweeps = sorted(p.parent for p in args.runs.glob("*/results.sqlite"))
    if not sweeps:
        sys.exit(f"no */results.sqlite under {args.runs}")
    tables = {sweep.name: summarise(sweep) for sweep in sweeps}
    for name, table in tables.items():
        print(markdown(f"**{name}** (`{args.runs / name}`)", table))
        best = best_learning_rates(table)
        if best:
            print(f"\n**{name}**, each optimizer at its best learning rate\n\n{best}")
            if args.figures:
                plot_learning_rates(table, args.figures / f"replication-{name}.png", name)
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1) + "\n")


if __name__ == "__main__":
    main()
