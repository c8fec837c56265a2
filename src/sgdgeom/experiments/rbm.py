"""RBM experiments: plain CD against the diffusion-metric update of the CD gradient.

Every update rule in ``updates`` trains an RBM from the same initial weights on the same
minibatches (binarised digits); each epoch records the exact mean log-likelihood of the
train and test parts (by enumerating the hidden states, so ``n_hidden <= 20``), and every
``spectrum_every`` epochs the spectrum of the CD gradients' diffusion matrix on a fixed
probe batch. Results: ``UPDATE/history.jsonl``, ``summary.json``, ``loglik.png`` and
``spectrum.png``, the plots drawn from the JSON lines alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from sgdgeom.data import batches, load_dataset
from sgdgeom.experiments.config import load_yaml_as
from sgdgeom.files import atomic_write_bytes, read_jsonl, save_figure
from sgdgeom.rbm import ENUMERATION_LIMIT, RBM

__all__ = ["RBMConfig", "load_rbm_config", "plot_rbm", "run_rbm"]

UPDATES = {"cd": None, "metric-weak": "weak", "metric-exact": "exact"}


class RBMConfig(BaseModel):
    """An RBM comparison: data, machine, CD-k settings and the update rules to compare."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    seed: int = 0
    dataset: Literal["digits", "mnist5k"] = "digits"
    threshold: float = Field(0.5, gt=0, lt=1)
    n_train: int | None = Field(None, ge=2)
    n_hidden: int = Field(16, ge=1, le=ENUMERATION_LIMIT)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.05, gt=0)
    k: int = Field(1, ge=1)
    persistent: bool = False
    updates: list[Literal["cd", "metric-weak", "metric-exact"]] = [
        "cd",
        "metric-weak",
        "metric-exact",
    ]
    eps: float | Literal["auto"] = "auto"
    safety: float = Field(0.5, gt=0, lt=1)
    spectrum_every: int = Field(5, ge=1)
    probe_size: int = Field(256, ge=2)


def load_rbm_config(path: str | Path) -> RBMConfig:
    """Read and validate an RBM config (YAML)."""
    return load_yaml_as(RBMConfig, path)


def _binary(config: RBMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset(config.dataset)
    train = (ds.x_train.flatten(1) > config.threshold).double()[: config.n_train]
    test = (ds.x_test.flatten(1) > config.threshold).double()
    return train, test


def run_rbm(config: RBMConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train one RBM per update rule and write the histories, summary and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = _binary(config)
    probe = train[: config.probe_size]
    summary: dict[str, Any] = {"name": config.name, "updates": {}}
    for update in config.updates:
        rbm = RBM(
            train.shape[1], config.n_hidden, generator=torch.Generator().manual_seed(config.seed)
        ).double()
        with torch.no_grad():  # visible biases at the data's log-odds (Hinton's recipe)
            mean = train.mean(0).clamp(1e-3, 1 - 1e-3)
            rbm.b.copy_(torch.log(mean / (1 - mean)))
        sampler = torch.Generator().manual_seed(config.seed + 1)
        chains = train[: config.batch_size].clone() if config.persistent else None
        history = []
        for epoch in tqdm(
            range(1, config.epochs + 1), desc=update, disable=not progress, leave=False
        ):
            order = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            for v, _ in batches(
                train, train[:, 0], config.batch_size, generator=order, drop_last=True
            ):
                stats = rbm.cd_statistics(v, config.k, sampler, chains)
                if chains is not None:
                    chains = stats.v_neg
                rbm.weight_update(
                    stats, config.lr, metric=UPDATES[update], eps=config.eps, safety=config.safety
                )
            log_z = rbm.log_partition()
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loglik": float(rbm.log_likelihood(train, log_z).mean()),
                "test_loglik": float(rbm.log_likelihood(test, log_z).mean()),
            }
            if epoch % config.spectrum_every == 0 or epoch == 1:
                stats = rbm.cd_statistics(probe, config.k, torch.Generator().manual_seed(0))
                D = rbm.diffusion_matrix(stats)
                values = D.eigvalsh()
                record |= {
                    "lambda": values[:10].tolist(),
                    "trace": D.trace(),
                    "rank": D.rank(),
                    "rank_bound": len(probe) - 1,
                }
            history.append(record)
            run_dir = out / update
            run_dir.mkdir(exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in history)
            atomic_write_bytes(run_dir / "history.jsonl", text.encode())
        summary["updates"][update] = {k: history[-1][k] for k in ("train_loglik", "test_loglik")}
        summary["updates"][update]["best_test_loglik"] = max(r["test_loglik"] for r in history)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    plot_rbm(out, config.updates, title=config.name)
    return summary


def plot_rbm(out_dir: str | Path, updates: list[str], title: str = "") -> None:
    """``loglik.png`` (test and train log-likelihood per epoch, one colour per update) and
    ``spectrum.png`` (the top eigenvalues of D of the CD gradients over training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    histories = {u: read_jsonl(out / u / "history.jsonl") for u in updates}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (update, records) in enumerate(histories.items()):
        epochs = [r["epoch"] for r in records]
        colour = f"C{i}"
        ax.plot(epochs, [r["test_loglik"] for r in records], color=colour, label=f"{update} test")
        ax.plot(
            epochs,
            [r["train_loglik"] for r in records],
            color=colour,
            ls="--",
            alpha=0.6,
            label=f"{update} train",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean exact log-likelihood (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "loglik.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 4), squeeze=False)
    for ax, (update, records) in zip(axes[0], histories.items(), strict=True):
        measured = [r for r in records if "lambda" in r]
        for record in measured:
            ax.semilogy(
                range(1, len(record["lambda"]) + 1),
                record["lambda"],
                marker="o",
                ms=3,
                label=f"epoch {record['epoch']}",
            )
        ax.set_xlabel("index k")
        ax.set_ylabel("λ_k of D (CD gradients)")
        ax.set_title(update)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "spectrum.png", dpi=120)
    plt.close(fig)
