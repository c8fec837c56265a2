"""Run one experiment config: build the data, model and optimizer, then train.

The run directory holds ``config.yaml`` (the validated config), ``metrics.jsonl``,
``checkpoint.pt`` and, once finished, ``final.json``. A directory that already holds a run
is never overwritten: resume it, or choose another directory. Nothing is written before
the data, the model, the optimizer and the loss are built, so bad input leaves no folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sgdgeom.data import Dataset, augmentation, load_dataset
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import (
    OPTIMIZER_KEYS,
    ExperimentConfig,
    OptimizerConfig,
    config_hash,
    parse_config,
    read_yaml,
    resume_key,
)
from sgdgeom.extras import require
from sgdgeom.files import atomic_write_bytes, read_jsonl
from sgdgeom.hessian import AlignmentMonitor
from sgdgeom.models import build_model
from sgdgeom.monitor import LayerTemperature, analyse_regimes, plot_temperatures, temperature_curves
from sgdgeom.steady_state import SteadyStateMonitor
from sgdgeom.train import (
    CHECKPOINT,
    METRICS,
    Callback,
    TensorBoardLogger,
    Trainer,
)

__all__ = ["build_optimizer", "run_training", "write_temperature_report"]


def build_optimizer(config: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a config names, over ``model``'s parameters."""
    sgd = dict(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    if config.name == "diffusion-sgd":
        from sgdgeom.optim import DiffusionMetricSGD

        return DiffusionMetricSGD(
            model,
            eps=config.eps if config.eps is not None else "auto",
            mode=config.mode or "weak",
            safety=config.safety or 0.5,
            fused="auto" if config.fused is None else config.fused,
            **sgd,
        )
    if config.name in ("sam", "asam"):
        return _sam(model, adaptive=config.name == "asam", rho=config.rho, **sgd)
    if config.name == "entropy-sgd":
        from sgdgeom.optim.entropy_sgd import EntropySGD

        given = {k: getattr(config, k) for k in OPTIMIZER_KEYS["entropy-sgd"]}
        return EntropySGD(
            model.parameters(), **sgd, **{k: v for k, v in given.items() if v is not None}
        )
    if config.name == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if config.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _sam(
    model: nn.Module, *, adaptive: bool, rho: float | None, **sgd: Any
) -> torch.optim.Optimizer:
    """SAM (Foret et al. 2021) or ASAM (Kwon et al. 2021) from pytorch-optimizer, over
    torch's SGD. Their ``step`` re-evaluates the loss, so it is marked as needing a
    closure (see :class:`~sgdgeom.train.Trainer`)."""
    SAM = require("pytorch_optimizer", f"optimizer {'asam' if adaptive else 'sam'}").SAM

    default_rho = 0.5 if adaptive else 0.05  # the values their papers use for CIFAR
    optimizer = SAM(
        model.parameters(),
        base_optimizer=torch.optim.SGD,
        rho=rho if rho is not None else default_rho,
        adaptive=adaptive,
        **sgd,
    )
    optimizer.requires_closure = True  # type: ignore[attr-defined]
    return optimizer


def _check_run_dir(config: ExperimentConfig, out_dir: Path, resume: bool) -> None:
    """Refuse a run directory that holds another config's run, or this run without
    ``resume``; reads only."""
    saved = out_dir / "config.yaml"
    if not saved.is_file():
        return
    previous = parse_config(read_yaml(saved), str(saved))
    if config_hash(previous) != config_hash(config):
        raise ConfigError(f"{out_dir} holds a run of a different config; choose another --out")
    if not resume and ((out_dir / CHECKPOINT).exists() or (out_dir / METRICS).exists()):
        raise ConfigError(
            f"{out_dir} already holds this run; pass --resume to continue it, or choose "
            f"another --out"
        )


def _write_run_config(config: ExperimentConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    atomic_write_bytes(out_dir / "config.yaml", text.encode())


def run_training(
    config: ExperimentConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    data_root: str | Path | None = None,
    device: str | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train the run a config describes and return its final summary (see :class:`Trainer`).

    ``device`` overrides the config's ``train.device``.
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_run_dir(config, out, resume)
    dataset = load_dataset(config.data.name, data_root).subset(
        config.data.n_train, config.data.n_test
    )
    torch.manual_seed(config.seed)
    model = build_model(
        config.model.name,
        dataset.input_shape,
        dataset.num_classes,
        init=config.model.init,
        **config.model.options,
    )
    optimizer = build_optimizer(config.optimizer, model)
    extra = {}
    if config.loss.name != "cross_entropy":
        from sgdgeom.optim.local_entropy import PartialLocalEntropy

        # generator=None: the trainer seeds torch's generator every epoch (resumable)
        extra["objective"] = PartialLocalEntropy(
            model,
            layers=config.loss.layers or "all",
            R=config.loss.R,
            gamma=config.loss.gamma,
            y=config.loss.y if config.loss.y is not None else 4,
            kind=config.loss.name,
            k=config.loss.k,
            route=config.loss.route or "auto",
            antithetic=bool(config.loss.antithetic),
        ).objective
    if out is not None:  # everything is built: the config is good, the run may begin
        _write_run_config(config, out)
    # the monitors first: callbacks given here see the epoch records they complete
    callbacks = [*_monitors(config, dataset, out), *callbacks]
    trainer = Trainer(
        model,
        dataset,
        optimizer,
        epochs=config.train.epochs,
        batch_size=config.data.batch_size,
        test_batch_size=config.data.test_batch_size,
        augment=augmentation(config.data.augment) if config.data.augment else None,
        callbacks=callbacks,
        out_dir=out,
        seed=config.seed,
        device=device or config.train.device,
        progress=progress,
        run_id=resume_key(config),
        **extra,
    )
    final = trainer.fit(resume=resume)
    if out is not None and config.monitor is not None and config.monitor.temperature:
        write_temperature_report(out, title=config.name)
    return final


def _monitors(config: ExperimentConfig, dataset: Dataset, out: Path | None) -> list[Callback]:
    monitor = config.monitor
    if monitor is None:
        return []
    callbacks: list[Callback] = []
    n = min(monitor.probe_size, len(dataset.y_train))
    probe = (dataset.normalize(dataset.x_train[:n]), dataset.y_train[:n])
    if monitor.temperature:
        callbacks.append(
            LayerTemperature(
                monitor.layers,
                snr=monitor.snr,
                trace_every=monitor.trace_every,
                probe=probe,
                loss_fn="cross_entropy",  # the base loss of every config (PLA smooths it)
            )
        )
    if monitor.current_every:
        callbacks.append(
            SteadyStateMonitor(
                probe,
                "cross_entropy",
                every=monitor.current_every,
                probes=monitor.current_probes,
                sections=monitor.curl_sections,
                seed=config.seed,
            )
        )
    if monitor.alignment_every:
        callbacks.append(
            AlignmentMonitor(
                probe,
                "cross_entropy",
                every=monitor.alignment_every,
                k=monitor.alignment_k,
                seed=config.seed,
            )
        )
    if monitor.tensorboard:
        if out is None:
            raise ConfigError("monitor.tensorboard needs a run directory (--out)")
        callbacks.append(TensorBoardLogger(out / "tensorboard"))
    return callbacks


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
