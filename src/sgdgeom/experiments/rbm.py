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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from sgdgeom._deprecated import warn
from sgdgeom.data import batches, load_dataset
from sgdgeom.errors import InputError
from sgdgeom.experiments.config import load_yaml_as
from sgdgeom.experiments.kinds import ExperimentKind, into_out, register_kind
from sgdgeom.files import atomic_write_bytes, read_jsonl, save_figure, write_jsonl
from sgdgeom.metric import Inverse
from sgdgeom.rbm import ENUMERATION_LIMIT, RBM

__all__ = ["KIND", "RBMConfig", "load_rbm_config", "plot_rbm", "run_rbm"]

UPDATES: dict[str, Inverse | None] = {"cd": None, "metric-weak": "weak", "metric-exact": "exact"}
"""The update rules compared: plain CD, and the metric update of the CD gradients with each
inverse of the metric (the rule's name is ``metric-`` and its inverse)."""


Update = Literal["cd", "metric-weak", "metric-exact"]
"""An update rule of :data:`UPDATES`."""

LR_DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
}
"""The learning rate's factor at ``progress`` ``u / U`` (update u of U, from 0), by name:
constant, or decayed linearly to ``lr / U`` at the last update."""

LRDecay = Literal["constant", "linear"]


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
    lr_decay: LRDecay = "constant"
    k: int = Field(1, ge=1)
    persistent: bool = False
    updates: list[Update] = Field(default_factory=lambda: list(get_args(Update)), min_length=1)
    eps: float | Literal["auto"] = "auto"
    eps_fraction: float = Field(0.5, gt=0, lt=1)
    spectrum_every: int = Field(5, ge=1)
    probe_size: int = Field(256, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "safety" in data:
            warn("RBM config key 'safety'", "'eps_fraction'", stacklevel=6)
            data = {k: v for k, v in data.items() if k != "safety"} | {
                "eps_fraction": data["safety"]
            }
        return data


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
    if config.batch_size > len(train):
        raise InputError(
            f"batch_size {config.batch_size} is larger than the {len(train)} training samples: "
            f"no full batch, so no update would run; use batch_size <= {len(train)}"
        )
    probe = train[: config.probe_size]
    summary: dict[str, Any] = {"name": config.name, "updates": {}}
    decay = LR_DECAYS[config.lr_decay]
    total = config.epochs * (len(train) // config.batch_size)
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
        step = 0
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
                    stats,
                    config.lr * decay(step / total),
                    inverse=UPDATES[update],
                    eps=config.eps,
                    eps_fraction=config.eps_fraction,
                )
                step += 1
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
            write_jsonl(run_dir / "history.jsonl", history)
        summary["updates"][update] = {k: history[-1][k] for k in ("train_loglik", "test_loglik")}
        summary["updates"][update]["best_test_loglik"] = max(r["test_loglik"] for r in history)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    plot_rbm(out, config.updates, title=config.name)
    return summary


def plot_rbm(out_dir: str | Path, updates: Sequence[str], title: str = "") -> list[Path]:
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
    return [out / "loglik.png", out / "spectrum.png"]


def _summary(summary: dict[str, Any]) -> str:
    lines = [f"{'update':<14} {'test LL':>10} {'best test':>10} {'train LL':>10}"]
    for update, row in summary["updates"].items():
        lines.append(
            f"{update:<14} {row['test_loglik']:>10.3f} {row['best_test_loglik']:>10.3f} "
            f"{row['train_loglik']:>10.3f}"
        )
    return "\n".join(lines)


def _plots(out: Path) -> list[Path]:
    summary = json.loads((out / "summary.json").read_text())
    return plot_rbm(out, list(summary["updates"]), title=summary["name"])


KIND = register_kind(
    ExperimentKind(
        name="rbm",
        help="Train RBMs by plain CD and by the diffusion-metric update; plot "
        "log-likelihoods (summary.json, loglik.png, spectrum.png).",
        config=RBMConfig,
        run=into_out(run_rbm),
        summary=_summary,
        plots=_plots,
    )
)
