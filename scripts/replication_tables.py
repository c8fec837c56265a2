"""The tables of docs/replication.md, from the result stores of the replication sweeps.

Run: ``python scripts/replication_tables.py runs/replication [--json OUT.json]`` (the report
keeps its tables in ``docs/benchmarks/replication.json``).

Every sweep folder under the argument (``*/results.sqlite``, written by ``sgdgeom sweep
configs/replication/*.yaml``) gives one table: one row per group of runs (the labels
without the seed), with the number of finished runs and, over them, mean ± standard error
over the seeds of the test accuracy at the selected epoch (picked on the validation part
where the runs hold one out, ``data.n_val``, else on the test set, as the table says), of
the final test accuracy and of the final test loss, and the wall-clock seconds per epoch.
A test accuracy also carries the test set's own binomial standard error,
``sqrt(p (1 − p) / n_test)``: the seeds share one test set, so no number of seeds lowers
it. Runs with a ``regimes.json`` (Musso Fig. 1) add the epochs of the regimes. A sweep over
``optimizer.lr`` adds a table of each variant at its best learning rate (by mean validation
accuracy where there is one, else by mean best test accuracy; ↑ or ↓ where that is the
grid's largest or smallest).

Every group is also compared with the :data:`BASELINE` group run by run, paired by seed:
the mean ± s.e. of the differences, and the binomial bound of a difference of two test
accuracies on one test set, ``sqrt(p₁(1 − p₁)/n + p₂(1 − p₂)/n)`` (an upper bound: the
two models' errors on a test image are positively correlated, which shrinks it). Where both
runs of every pair kept which test images their picked model classifies correctly
(``test_correct.npy``, written by sgdgeom's trainer), the difference gets the test set's
*paired* standard error instead: with ``c`` the 0/1 vectors and ``δ_j`` image j's
difference averaged over the pairs, ``sd(δ) / sqrt(n)`` (McNemar's: only the images the
two models disagree on count). ``--contrast A B`` (repeatable) adds ``A − B`` for two other
groups the same way, e.g. Musso §4.2's ``"pla R=0.01 layers=fc2" "pla R=0.01 layers=fc1"``.
``--figures DIR --versus LABEL`` draws those paired differences against a label (e.g.
``loss.R``), both error bars shown (:func:`plot_paired_versus`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.data import load_dataset
from sgdgeom.errors import SgdgeomError
from sgdgeom.experiments.plots import group_label, mean_and_error
from sgdgeom.experiments.store import ResultStore
from sgdgeom.files import safe_name, save_figure
from sgdgeom.train import TEST_CORRECT

METRICS = ("best_test_acc", "final_test_acc", "final_test_loss")
ACCURACIES = ("best_test_acc", "final_test_acc")
"""The test accuracies, which get a binomial standard error."""
BASELINE = "none"
"""The group that every other group is also compared with, run by run, paired by seed."""


def summarise(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """``{group: {metric: [mean, s.e.], "runs": n, "failed": m, "seconds_per_epoch": s,
    "selected_by": "val_acc" or "test_acc", "binomial": {accuracy: s.e.}, ...}}``; the
    metrics are None where no run of the group finished, ``best_val_acc`` is there where
    every finished run picked its epoch on a validation part. Where the sweep has a group
    named :data:`BASELINE`, every other group also gets ``"paired"``: ``{metric: [mean,
    s.e.]}`` of its runs' differences from the baseline run of the same seed, ``"pairs"``,
    their number, and ``"paired_binomial"``: the binomial bound of each accuracy's
    difference, and ``"paired_test_se"``, the test set's paired s.e. of the picked epochs'
    accuracy difference, where every pair kept :data:`~sgdgeom.train.TEST_CORRECT`."""
    store = ResultStore(sweep_dir / "results.sqlite")
    groups = _groups(store)
    by_seed = _by_seed(sweep_dir, groups)
    table = {}
    for name, group in sorted(groups.items()):
        runs = [run for run in group if run["status"] == "finished"]
        labels = {k: v for k, v in group[0]["labels"].items() if k != "seed"}
        failed = sum(run["status"] == "failed" for run in group)
        row: dict[str, Any] = {"runs": len(runs), "failed": failed, "labels": labels}
        for metric in METRICS:
            values = [run["final"][metric] for run in runs]
            row[metric] = [float(v) for v in mean_and_error(values)] if values else None
        validated = bool(runs) and all(r["final"].get("selected_by") == "val_acc" for r in runs)
        row["selected_by"] = "val_acc" if validated else "test_acc"
        if validated:
            values = [run["final"]["best_val_acc"] for run in runs]
            row["best_val_acc"] = [float(v) for v in mean_and_error(values)]
        row["test_samples"] = _test_samples(runs)
        row["binomial"] = {m: _binomial(row[m], row["test_samples"]) for m in ACCURACIES}
        seconds = [e["seconds"] for run in runs for e in store.epochs(run["hash"])]
        row["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
        regimes = [sweep_dir / "runs" / run["name"] / "regimes.json" for run in runs]
        if runs and all(path.exists() for path in regimes):
            found = [json.loads(path.read_text()) for path in regimes]
            for key in ("t_cross", "t_peak", "t_late"):
                values = [f[key] for f in found if f[key] is not None]
                row[key] = [float(v) for v in mean_and_error(values)] if values else None
                row[f"{key}_runs"] = len(values)
        if name != BASELINE and BASELINE in by_seed:
            row |= paired_difference(by_seed[name], by_seed[BASELINE], row["test_samples"])
        table[name] = row
    return table


Finished = dict[Any, tuple[dict[str, Any], "np.ndarray | None"]]
"""A group's finished runs by seed: ``{seed: (final, test_correct or None)}``."""


def _groups(store: ResultStore) -> dict[str, list[dict[str, Any]]]:
    """The store's runs by group label (the labels without the seed)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in store.runs():
        groups[group_label(run["labels"])].append(run)
    return groups


def _by_seed(sweep_dir: Path, groups: dict[str, list[dict[str, Any]]]) -> dict[str, Finished]:
    return {
        name: {
            run["labels"].get("seed"): (run["final"], _test_correct(sweep_dir, run))
            for run in group
            if run["status"] == "finished"
        }
        for name, group in groups.items()
    }


def paired_difference(one: Finished, two: Finished, n: int | None) -> dict[str, Any]:
    """``one − two`` run by run, paired by seed: ``"pairs"``, ``"paired"`` (``{metric:
    [mean, s.e.]}``), ``"paired_binomial"`` (each accuracy difference's binomial bound at
    the paired runs' means) and ``"paired_test_se"`` (:func:`_paired_test_se`); {} where
    no seed has both."""
    seeds = sorted(set(one) & set(two), key=str)
    if not seeds:
        return {}

    def mean(group: Finished, metric: str) -> list[float]:
        return [float(v) for v in mean_and_error([group[s][0][metric] for s in seeds])]

    return {
        "pairs": len(seeds),
        "paired": {
            metric: [
                float(v)
                for v in mean_and_error([one[s][0][metric] - two[s][0][metric] for s in seeds])
            ]
            for metric in METRICS
        },
        "paired_binomial": {
            metric: _binomial_difference(mean(one, metric), mean(two, metric), n)
            for metric in ACCURACIES
        },
        "paired_test_se": _paired_test_se([(one[s][1], two[s][1]) for s in seeds]),
    }


def contrasts(sweep_dir: Path, pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """``{"A − B": paired_difference}`` for each pair of group labels held by the sweep
    (e.g. ``("pla R=0.01 layers=fc2", "pla R=0.01 layers=fc1")``, Musso §4.2's contrast)."""
    groups = _groups(ResultStore(sweep_dir / "results.sqlite"))
    by_seed = _by_seed(sweep_dir, groups)
    n = _test_samples([run for group in groups.values() for run in group if run["final"]])
    return {
        f"{a} − {b}": paired_difference(by_seed[a], by_seed[b], n)
        for a, b in pairs
        if a in by_seed and b in by_seed
    }


def _test_correct(sweep_dir: Path, run: dict[str, Any]) -> np.ndarray | None:
    """A finished run's :data:`~sgdgeom.train.TEST_CORRECT`, where it is there and agrees
    with the run's own best test accuracy (else None)."""
    path = sweep_dir / "runs" / run["name"] / TEST_CORRECT
    if run["status"] != "finished" or not path.is_file():
        return None
    try:
        correct = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:  # truncated, not .npy, or pickled objects
        print(f"{path}: not a readable .npy ({err}); left out", file=sys.stderr)
        return None
    final = run["final"]
    size = final.get("test_samples", len(correct))  # older runs did not record it
    if correct.shape != (size,) or correct.mean() != final["best_test_acc"]:
        print(f"{path}: does not match its run's final.json; left out", file=sys.stderr)
        return None
    return correct


def _paired_test_se(pairs: list[tuple[np.ndarray | None, np.ndarray | None]]) -> float | None:
    """``sd(δ) / sqrt(n)``, ``δ_j`` the mean over the pairs of image j's correctness in the
    first run minus the second's; None unless every pair kept both vectors."""
    if not pairs or any(one is None or two is None for one, two in pairs):
        return None
    delta = np.mean([one.astype(float) - two.astype(float) for one, two in pairs], axis=0)
    return float(delta.std(ddof=1) / math.sqrt(len(delta)))


def _test_samples(runs: list[dict[str, Any]]) -> int | None:
    """The test set's size: from the runs' ``final.json`` (``test_samples``), else from the
    dataset their config names; None where neither says."""
    for run in runs:
        if "test_samples" in run["final"]:
            return int(run["final"]["test_samples"])
    for run in runs:
        name = (run["config"].get("data") or {}).get("name")
        if name is not None:
            try:
                return len(load_dataset(name).y_test)
            except SgdgeomError:
                return None
    return None


def _binomial(accuracy: list[float] | None, n: int | None) -> float | None:
    """``sqrt(p (1 − p) / n)`` at the mean accuracy p."""
    if accuracy is None or not n:
        return None
    p = accuracy[0]
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _binomial_difference(
    accuracy: list[float] | None, baseline: list[float], n: int | None
) -> float | None:
    """``sqrt(p₁(1 − p₁)/n + p₂(1 − p₂)/n)``: the bound for two independent error
    patterns on one test set of ``n`` images."""
    one, two = _binomial(accuracy, n), _binomial(baseline, n)
    return None if one is None or two is None else math.hypot(one, two)


def _runs_cell(row: dict[str, Any]) -> str:
    return f"{row['runs']} ({row['failed']} failed)" if row["failed"] else str(row["runs"])


def _picked_on(table: dict[str, dict[str, Any]]) -> str:
    """Where the table's best epochs were picked, in words."""
    places = {row["selected_by"] for row in table.values() if row["runs"]}
    if places == {"val_acc"}:
        return "picked on the validation part"
    return "picked on the test set" if places == {"test_acc"} else "picked on validation or test"


def markdown(title: str, table: dict[str, dict[str, Any]]) -> str:
    """One row per group; an accuracy reads ``mean ± s.e. over seeds ± binomial s.e. of
    the test set`` (the last where the test set's size is known), a paired difference
    ``mean ± s.e. (± the test set's paired s.e., "paired")`` where the runs kept
    ``test_correct.npy``, else ``mean ± s.e. (± its binomial bound)``."""

    def cell(
        value: list[float] | None,
        digits: int = 4,
        binomial: float | None = None,
        seeds: int = 2,
    ) -> str:
        if value is None:
            return "—"
        # one seed has no seed error: "(1 seed)" in its place
        spread = "(1 seed)" if seeds == 1 else f"± {value[1]:.{digits}f}"
        text = f"{value[0]:.{digits}f} {spread}"
        return text if binomial is None else f"{text} ± {binomial:.{digits}f}"

    lines = [
        f"\n{title}\n",
        f"| group | runs | test acc at the best epoch ({_picked_on(table)}) | final test acc "
        f"| final test loss | s / epoch | best-epoch test acc − {BASELINE}, paired by seed "
        "(± the test set's paired s.e., or its binomial bound) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        seconds = row["seconds_per_epoch"]
        paired = row.get("paired", {}).get("best_test_acc")
        bound = row.get("paired_binomial", {}).get("best_test_acc")
        spread = "(1 pair)" if row.get("pairs") == 1 else f"± {paired[1]:.4f}" if paired else ""
        difference = "—" if paired is None else f"{paired[0]:+.4f} {spread}"
        paired_se = row.get("paired_test_se")
        if paired is not None and paired_se is not None:
            difference += f" (± {paired_se:.4f} paired)"
        elif paired is not None and bound is not None:
            difference += f" (± {bound:.4f})"
        binomial, runs = row["binomial"], row["runs"]
        lines.append(
            f"| {name} | {_runs_cell(row)} | "
            f"{cell(row['best_test_acc'], binomial=binomial['best_test_acc'], seeds=runs)} | "
            f"{cell(row['final_test_acc'], binomial=binomial['final_test_acc'], seeds=runs)} | "
            f"{cell(row['final_test_loss'], seeds=runs)} | "
            f"{'—' if seconds is None else f'{seconds:.2f}'} | {difference} |"
        )
        if "t_cross" in row:
            lines.append(
                f"| {name}: regimes (epochs) | | t_cross {cell(row['t_cross'], 0)} | "
                f"t_peak {cell(row['t_peak'], 0)} | t_late {cell(row['t_late'], 0)} | | |"
            )
    return "\n".join(lines)


def contrast_markdown(found: dict[str, dict[str, Any]]) -> str:
    """One row per contrast: pairs, the mean ± seed s.e. of the paired differences of the
    best-epoch test accuracy, and the test set's paired s.e. (or its binomial bound)."""
    lines = [
        "| contrast (test acc at the best epoch) | pairs | mean ± s.e. over seeds | test set |",
        "| --- | --- | --- | --- |",
    ]
    for name, found_row in found.items():
        if not found_row:
            continue
        mean, error = found_row["paired"]["best_test_acc"]
        spread = "(1 pair)" if found_row["pairs"] == 1 else f"± {error:.4f}"
        paired_se = found_row["paired_test_se"]
        bound = found_row["paired_binomial"]["best_test_acc"]
        test = f"± {paired_se:.4f} paired" if paired_se is not None else f"± {bound:.4f} bound"
        lines.append(f"| {name} | {found_row['pairs']} | {mean:+.4f} {spread} | {test} |")
    return "\n".join(lines)


def best_learning_rates(table: dict[str, dict[str, Any]]) -> str:
    """Each variant at its best ``optimizer.lr``, as a markdown table ("" without a grid).

    A grid point where no run finished cannot be best and is marked (:func:`_unfinished`);
    ↑ or ↓ marks a best point at the grid's edge, where the optimum may lie beyond it.
    """
    by_variant = _lr_grids(table)
    if not by_variant:
        return ""
    rows_all = {f"{v} {lr}": row for v, rows in by_variant.items() for lr, row in rows.items()}
    lines = [
        f"| optimizer | lr grid | best lr ({_picked_on(rows_all).removeprefix('picked ')}) "
        "| runs | test acc at the best epoch | final test acc | final test loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def best(rows: dict[float, dict[str, Any]]) -> float:
        return max((lr for lr in rows if rows[lr]["runs"]), key=lambda v: _accuracy(rows[v]))

    ranked = sorted(by_variant.items(), key=lambda item: -_accuracy(item[1][best(item[1])]))
    for variant, rows in ranked:
        grid = sorted(rows)
        lr = best(rows)
        edge = " ↑" if lr == grid[-1] else " ↓" if lr == grid[0] else ""
        row = rows[lr]
        cells = []
        for metric in METRICS:
            binomial = row["binomial"].get(metric)
            cells.append(
                f"{row[metric][0]:.4f} ± {row[metric][1]:.4f}"
                + ("" if binomial is None else f" ± {binomial:.4f}")
            )
        points = ", ".join(f"{v:g}{_unfinished(rows[v])}" for v in grid)
        lines.append(
            f"| {variant} | {points} | {lr:g}{edge} | {_runs_cell(row)} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def _lr_grids(table: dict[str, dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """``{variant: {lr: row}}`` of the variants swept over ``optimizer.lr`` with at least
    one finished run."""
    by_variant: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for row in table.values():
        if "optimizer.lr" in row["labels"]:
            by_variant[row["labels"]["variant"]][float(row["labels"]["optimizer.lr"])] = row
    return {v: rows for v, rows in by_variant.items() if any(r["runs"] for r in rows.values())}


def _unfinished(row: dict[str, Any]) -> str:
    """ "" for a grid point with a finished run, † where every run failed (e.g. a
    non-finite loss), * where none has finished yet."""
    return "" if row["runs"] else "†" if row["failed"] else "*"


def _accuracy(row: dict[str, Any]) -> float:
    """What a grid point is ranked by: the mean validation accuracy at the picked epochs
    where the runs hold a validation part out, else the mean best test accuracy."""
    return (row.get("best_val_acc") or row["best_test_acc"])[0]


def plot_learning_rates(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Best test accuracy of every optimizer at each point of its lr grid, mean ± s.e. bars,
    the axis zoomed to the optimizers' best points (differences of a few tenths of a
    percent are the point): a bar below the axis is written as its value at the bottom, a
    grid point without a finished run as † or * (:func:`_unfinished`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_variant = _lr_grids(table)
    tops = {
        v: max(_accuracy(r) for r in rows.values() if r["runs"]) for v, rows in by_variant.items()
    }
    names = sorted(tops, key=lambda v: -tops[v])
    floor = min(tops.values()) - 0.02
    points = max(len(grid) for grid in by_variant.values())
    width = 0.8 / points
    fig, ax = plt.subplots(figsize=(11, 4))
    labelled: set[int] = set()
    for i, name in enumerate(names):
        for j, lr in enumerate(sorted(by_variant[name])):
            x = i + (j - (points - 1) / 2) * width
            row = by_variant[name][lr]
            if not row["runs"] or _accuracy(row) < floor:
                note = _unfinished(row) or f"{_accuracy(row):.2f}"
                ax.text(x, floor, f"{lr:g}: {note}", ha="center", va="bottom", fontsize=6,
                        rotation=90)  # fmt: skip
                continue
            mean, error = row["best_test_acc"]
            ax.bar(x, mean, width, yerr=error, capsize=2,
                   color=plt.cm.viridis(0.1 + 0.7 * j / max(points - 1, 1)),
                   label=None if j in labelled else f"{j + 1}")  # fmt: skip
            labelled.add(j)
            ax.text(x, mean + error, f"{lr:g}", ha="center", va="bottom", fontsize=6,
                    rotation=90)  # fmt: skip
    ax.set_ylim(floor, max(tops.values()) + 0.012)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("best test accuracy")
    ax.set_title(f"{title}: each optimizer over its lr grid (mean ± s.e. over seeds)")
    ax.legend(title="lr grid point (1 = lowest)", fontsize=8, ncols=points)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def paired_versus_series(
    table: dict[str, dict[str, Any]], x: str
) -> dict[str, list[tuple[float, float, float, float, int]]]:
    """The groups with the label ``x`` by line (their label without ``x``), each point
    ``(x, mean, seed s.e., total s.e., pairs)`` of the best-epoch test accuracy − the
    :data:`BASELINE`, paired by seed, sorted by ``x``: the seed s.e. is the paired
    differences' (0 for one pair), the total adds the test set's paired s.e. (or, without
    ``test_correct.npy``, the binomial bound; nothing where the test set's size is unknown,
    so the two bars coincide) in quadrature."""
    series: dict[str, list[tuple[float, float, float, float, int]]] = defaultdict(list)
    for row in table.values():
        labels = row["labels"]
        if x not in labels or not row.get("pairs"):
            continue
        mean, seed_se = row["paired"]["best_test_acc"]
        test_se = row["paired_test_se"]
        if test_se is None:
            test_se = row["paired_binomial"]["best_test_acc"] or 0.0
        line = group_label({k: v for k, v in labels.items() if k != x})
        point = (float(labels[x]), mean, seed_se, math.hypot(seed_se, test_se), row["pairs"])
        series[line].append(point)
    return {line: sorted(points) for line, points in sorted(series.items())}


def plot_paired_versus(table: dict[str, dict[str, Any]], x: str, path: Path, title: str) -> None:
    """Each group's best-epoch test accuracy − the :data:`BASELINE`'s, paired by seed,
    against the label ``x`` (:func:`paired_versus_series`; a log axis where every value is
    positive, as R's, else a linear one, as a weight decay's with 0): thick bars the
    seeds' s.e., thin capped bars with the test set's paired s.e. added, each point's
    number of pairs written beside it where more than one; 0 is the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = paired_versus_series(table, x)
    values = [point[0] for points in series.values() for point in points]
    log_x = min(values) > 0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(0.0, color="k", lw=1, ls="--", label=f"{BASELINE} (paired by seed)")
    for i, (line, points) in enumerate(series.items()):
        xs, means, seed_se, total_se, pairs = (np.array(v) for v in zip(*points, strict=True))
        offset = i - (len(series) - 1) / 2  # lines side by side at a shared x
        spread = max(values) - min(values) or 1.0
        shifted = xs * 1.04**offset if log_x else xs + 0.01 * spread * offset
        drawn = ax.errorbar(shifted, means, yerr=total_se, marker="o", ms=4, capsize=3,
                            lw=1, label=line)  # fmt: skip
        color = drawn[0].get_color()
        ax.errorbar(shifted, means, yerr=seed_se, fmt="none", lw=3, color=color)
        for px, py, n in zip(shifted, means, pairs, strict=True):
            if n > 1:
                ax.annotate(f"{n}", (px, py), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)  # fmt: skip
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(min(values) / 2, max(values) * 2)
    ax.set_xlabel(x)
    ax.set_ylabel(f"test acc − {BASELINE} at the picked epochs")
    ax.set_title(f"{title}, paired by seed\nthick: the seeds' s.e.; thin: with the test set's")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding one folder per sweep")
    parser.add_argument("--json", type=Path, help="write every table here too")
    parser.add_argument(
        "--figures",
        type=Path,
        help="draw each lr-grid sweep's bars (and, with --versus, the paired differences) "
        "into this folder",
    )
    parser.add_argument(
        "--versus",
        metavar="LABEL",
        help="with --figures, also draw each sweep's paired differences from "
        f"{BASELINE!r} against this label (e.g. loss.R)",
    )
    parser.add_argument(
        "--contrast",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also A − B, paired by seed, for two group labels (repeatable)",
    )
    args = parser.parse_args()
    if args.versus and not args.figures:
        parser.error("--versus draws a figure: give --figures DIR too")
    sweeps = sorted(p.parent for p in args.runs.glob("*/results.sqlite"))
    if not sweeps:
        sys.exit(f"no */results.sqlite under {args.runs}")
    tables = {sweep.name: summarise(sweep) for sweep in sweeps}
    found_contrasts: dict[str, dict[str, dict[str, Any]]] = {}
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        print(markdown(f"**{name}** (`{args.runs / name}`)", table))
        if args.contrast:
            found = contrasts(args.runs / name, [tuple(pair) for pair in args.contrast])
            if any(found.values()):
                print(f"\n**{name}**, contrasts\n\n{contrast_markdown(found)}")
                found_contrasts[name] = found
        if args.figures and args.versus and paired_versus_series(table, args.versus):
            stem = safe_name(f"replication-{name}-paired-versus-{args.versus}")
            plot_paired_versus(table, args.versus, args.figures / f"{stem}.png", name)
        best = best_learning_rates(table)
        if best:
            print(f"\n**{name}**, each optimizer at its best learning rate\n\n{best}")
            if args.figures:
                plot_learning_rates(table, args.figures / f"replication-{name}.png", name)
    if args.json:
        written: dict[str, Any] = dict(tables)
        if args.contrast:
            written["contrasts"] = found_contrasts
        args.json.write_text(json.dumps(written, indent=1) + "\n")


if __name__ == "__main__":
    main()
