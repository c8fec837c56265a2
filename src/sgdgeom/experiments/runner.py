"""Run one experiment config: build the data, model and optimizer, then train.

The run directory holds ``config.yaml`` (the validated config), ``metrics.jsonl``,
``checkpoint.pt`` and, once finished, ``final.json``. A directory that already holds a run
is never overwritten: resume it, or choose another directory. Nothing is written before
the data, the model, the optimizer and the loss are built, so bad input leaves no folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sgdgeom._deprecated import moved, warn
from sgdgeom.callbacks import Callback
from sgdgeom.data import Dataset, augmentation, load_dataset
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import (
    ExperimentConfig,
    config_hash,
    parse_config,
    read_yaml,
    resume_key,
)
from sgdgeom.experiments.kinds import KINDS, RunContext
from sgdgeom.files import atomic_write_bytes
from sgdgeom.models import build_model
from sgdgeom.monitors import MonitorContext
from sgdgeom.optim import OptimizerOptions
from sgdgeom.train import CHECKPOINT, METRICS, Trainer

__all__ = ["build_monitors", "build_optimizer", "check_run_dir", "run_training"]

__getattr__ = moved(
    "sgdgeom.experiments.runner",
    {"write_temperature_report": "sgdgeom.experiments.temperature"},
)


def build_optimizer(config: OptimizerOptions, model: nn.Module) -> torch.optim.Optimizer:
    """Deprecated: ``config.build(model)``."""
    warn("sgdgeom.experiments.runner.build_optimizer(config, model)", "config.build(model)")
    return config.build(model)


def check_run_dir(config: ExperimentConfig, out_dir: Path, resume: bool) -> None:
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
        check_run_dir(config, out, resume)
    dataset = load_dataset(config.data.name, data_root).subset(
        config.data.n_train, config.data.n_test
    )
    if config.data.n_val is not None:
        dataset = dataset.hold_out(config.data.n_val)
    if not config.data.normalize:
        dataset = dataset.raw()
    torch.manual_seed(config.seed)
    model = build_model(
        config.model.name,
        dataset.input_shape,
        dataset.num_classes,
        init=config.model.init,
        **config.model.options,
    )
    optimizer = config.optimizer.build(model)
    objective = config.loss.objective(model)
    monitors = build_monitors(config, dataset, out)
    if out is not None:  # everything is built: the config is good, the run may begin
        _write_run_config(config, out)
    # the monitors first: callbacks given here see the epoch records they complete
    trainer = Trainer(
        model,
        dataset,
        optimizer,
        epochs=config.train.epochs,
        batch_size=config.data.batch_size,
        test_batch_size=config.data.test_batch_size,
        augment=augmentation(config.data.augment) if config.data.augment else None,
        callbacks=[*monitors, *callbacks],
        out_dir=out,
        seed=config.seed,
        device=device or config.train.device,
        progress=progress,
        run_id=resume_key(config),
        objective=objective,
    )
    final = trainer.fit(resume=resume)
    if out is not None and config.monitor is not None:
        for options in config.monitor.monitors.values():
            if options.report is not None:  # the monitor's report on the finished run
                kind = KINDS[options.report]
                kind.run(kind.parse({"run_dir": out}, kind.name), RunContext(None, False))
    return final


def build_monitors(config: ExperimentConfig, dataset: Dataset, out: Path | None) -> list[Callback]:
    """The callbacks of the config's monitors, in the order given, on a probe batch of the
    first ``probe_size`` training samples (normalised) and the run's base loss (the one
    PLA smooths)."""
    monitor = config.monitor
    if monitor is None or not monitor.monitors:
        return []
    n = min(monitor.probe_size, len(dataset.y_train))
    probe = (dataset.normalize(dataset.x_train[:n]), dataset.y_train[:n])
    context = MonitorContext(probe, "cross_entropy", config.seed, out)
    ordered = sorted(monitor.monitors.values(), key=lambda options: options.reads_metrics)
    return [options.build(context) for options in ordered]
