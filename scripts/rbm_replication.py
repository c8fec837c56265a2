"""The poster's RBM outlook over seeds and learning rates, with a difference panel.

Run: ``python scripts/rbm_replication.py [CONFIG] [--seeds 0 1 2] [--lrs 0.05 0.1]
[--out runs/replication/rbm-digits]``

For every learning rate and seed, :func:`~sgdgeom.experiments.rbm.run_rbm` trains one RBM
per update rule of CONFIG (CD-k, and the weak and exact diffusion-metric updates of the
same CD gradients) into ``OUT/lr=LR_seed=S`` (a finished one is skipped, so the script
resumes). Then, per learning rate: the exact test log-likelihood per epoch, mean ± s.e.
over seeds, and below it the difference of each metric update from CD, paired by seed (the
panel where the curves themselves coincide). Writes ``OUT/summary.json`` and
``OUT/rbm-replication.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from sgdgeom.experiments.plots import mean_and_error
from sgdgeom.experiments.rbm import load_rbm_config, run_rbm
from sgdgeom.files import read_jsonl, save_figure


def curves(run_dir: Path, updates: list[str], key: str = "test_loglik") -> dict[str, np.ndarray]:
    """``{update: log-likelihood per epoch}`` of one finished run (``key``: ``test_loglik``
    or ``train_loglik``)."""
    return {
        u: np.array([r[key] for r in read_jsonl(run_dir / u / "history.jsonl")]) for u in updates
    }


LAST = 10
"""Epochs at the end whose mean judges a run (one epoch's value is noisy)."""


def summarise(
    runs: list[dict[str, np.ndarray]],
    updates: list[str],
    train: list[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Best and final test log-likelihood per update, the mean over the last :data:`LAST`
    epochs, and each one's difference from CD, paired by seed: ``[mean, s.e.]`` over the
    runs, and the last epochs' mean of each run in ``runs``' order (``..._per_run``, which
    :func:`picks` pairs across learning rates); with ``train`` (the same runs' training
    log-likelihoods), the training mean over the last epochs too, which picks a learning
    rate without looking at the test set."""
    out: dict[str, Any] = {"runs": len(runs)}
    for u in updates:
        best = mean_and_error([r[u].max() for r in runs])
        final = mean_and_error([r[u][-1] for r in runs])
        per_run = [float(r[u][-LAST:].mean()) for r in runs]
        out[u] = {"best_test_loglik": [float(v) for v in best]}
        out[u]["final_test_loglik"] = [float(v) for v in final]
        out[u][f"last{LAST}_test_loglik"] = [float(v) for v in mean_and_error(per_run)]
        out[u][f"last{LAST}_test_loglik_per_run"] = per_run
        if u != updates[0]:
            base = updates[0]
            gain = mean_and_error([r[u][-1] - r[base][-1] for r in runs])
            out[u][f"final_minus_{base}"] = [float(v) for v in gain]
            base_per_run = out[base][f"last{LAST}_test_loglik_per_run"]
            gain = mean_and_error(np.subtract(per_run, base_per_run))
            out[u][f"last{LAST}_minus_{base}"] = [float(v) for v in gain]
        if train is not None:
            fit = mean_and_error([r[u][-LAST:].mean() for r in train])
            out[u][f"last{LAST}_train_loglik"] = [float(v) for v in fit]
    return out


def picks(by_lr: dict[str, dict[str, Any]], updates: list[str]) -> dict[str, Any]:
    """Each update at its learning rate with the best mean training log-likelihood over the
    last :data:`LAST` epochs (picked without the test set), and each metric update's test
    difference from CD at CD's own pick, paired by seed (every learning rate runs the same
    seeds, so the pairing holds across learning rates too): ``[mean, s.e.]``."""
    key = f"last{LAST}_train_loglik"
    chosen = {u: max(by_lr, key=lambda lr, u=u: by_lr[lr][u][key][0]) for u in updates}
    out: dict[str, Any] = {"by": key}
    base = updates[0]
    per_run = f"last{LAST}_test_loglik_per_run"
    control = np.array(by_lr[chosen[base]][base][per_run])
    for u in updates:
        picked = by_lr[chosen[u]][u]
        out[u] = {"lr": chosen[u], f"last{LAST}_test_loglik": picked[f"last{LAST}_test_loglik"]}
        if u != base:
            gain = mean_and_error(np.array(picked[per_run]) - control)
            out[u][f"minus_{base}_at_its_pick"] = [float(v) for v in gain]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quick/rbm/digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument(
        "--lr-decay", choices=("constant", "linear"), help="override the config's lr_decay"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/replication/rbm-digits"))
    args = parser.parse_args()
    base = load_rbm_config(args.config)
    if args.lr_decay:
        base = base.model_copy(update={"lr_decay": args.lr_decay})
    updates = list(base.updates)
    summary: dict[str, Any] = {"config": args.config, "lrs": {}}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.lrs), figsize=(6 * len(args.lrs), 7), squeeze=False)
    for column, lr in enumerate(args.lrs):
        runs, train = [], []
        for seed in args.seeds:
            run_dir = args.out / f"lr={lr:g}_seed={seed}"
            if not (run_dir / "summary.json").exists():
                config = base.model_copy(update={"seed": seed, "lr": lr})
                run_rbm(config, run_dir, progress=False)
            runs.append(curves(run_dir, updates))
            train.append(curves(run_dir, updates, "train_loglik"))
        summary["lrs"][f"{lr:g}"] = summarise(runs, updates, train)
        epochs = np.arange(1, len(runs[0][updates[0]]) + 1)
        top, bottom = axes[0, column], axes[1, column]
        for u in updates:
            mean, error = mean_and_error([r[u] for r in runs])
            (line,) = top.plot(epochs, mean, label=u)
            top.fill_between(epochs, mean - error, mean + error, alpha=0.2, color=line.get_color())
            if u != updates[0]:
                diff, diff_error = mean_and_error([r[u] - r[updates[0]] for r in runs])
                bottom.plot(epochs, diff, label=f"{u} − {updates[0]}", color=line.get_color())
                bottom.fill_between(
                    epochs,
                    diff - diff_error,
                    diff + diff_error,
                    alpha=0.2,
                    color=line.get_color(),
                )
        bottom.axhline(0.0, color="black", lw=0.8)
        top.set_title(f"{base.name}, lr = {lr:g}, {len(runs)} seeds (mean ± s.e.)")
        top.set_ylabel("test log-likelihood (nats)")
        bottom.set_ylabel(f"difference from {updates[0]} (nats)")
        bottom.set_xlabel("epoch")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    summary["picked"] = picks(summary["lrs"], updates)
    fig.tight_layout()
    save_figure(fig, args.out / "rbm-replication.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
