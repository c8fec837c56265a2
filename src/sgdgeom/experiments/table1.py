"""Fioresi et al.'s Table 1: the number of weights d, the number of samples N and the rank
bound of the diffusion matrix, rank D ≤ min(d, N − 1) (F3), which shows that D is singular
for every practical network (d ≫ N).

:func:`size_table` counts d by building the model (no data is read: the full datasets'
shapes and sizes are known), for the papers' models or for any model by name. The
paper's own rows (ResNet, Wide ResNet, DenseNet on CIFAR and SVHN) are quoted as printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from sgdgeom.errors import ConfigError
from sgdgeom.experiments.kinds import ExperimentKind, RunContext, register_kind
from sgdgeom.models import MODELS, build_model

__all__ = [
    "DATASET_SIZES",
    "TRAINING_N",
    "KIND",
    "Table1Config",
    "PAPER_MODELS",
    "QUOTED_TABLE1",
    "format_table",
    "size_row",
    "size_table",
]

DATASET_SIZES: dict[str, tuple[tuple[int, ...], int, int]] = {
    # name: (input shape, training samples N, classes)
    "digits": ((1, 8, 8), 1438, 10),
    "mnist5k": ((1, 28, 28), 4000, 10),
    "mnist1d": ((40,), 4000, 10),
    "mnist": ((1, 28, 28), 60000, 10),
    "fashion-mnist": ((1, 28, 28), 60000, 10),
    "cifar10": ((3, 32, 32), 50000, 10),
    "stl10": ((3, 96, 96), 5000, 10),
}
"""Input shape, training-set size N and classes of each dataset (for the embedded ones, the
training part of sgdgeom's fixed split)."""

PAPER_MODELS: list[tuple[str, str, dict[str, Any], str]] = [
    ("fc", "fashion-mnist", {"depth": 2}, "Musso §4.2"),
    ("fc", "mnist", {"depth": 3}, "Musso §4.3"),
    ("fc", "mnist", {"depth": 3}, "Musso Fig. 1 (4 weight layers)"),
    ("cnn-cifar10", "cifar10", {}, "Musso §5.2, eq. 24"),
    ("cnn-stl10", "stl10", {}, "Musso §5.3, eq. 25"),
    ("resnet18-gn", "cifar10", {}, "ResNet-18, CIFAR layout"),
]
"""(model, dataset, model options, where) for every network the papers train, and the one
ResNet sgdgeom builds (Table 1's own ResNet, Wide ResNet and DenseNet variants are not
among sgdgeom's models, so their d stays quoted)."""

QUOTED_TABLE1: list[tuple[str, float, int, int]] = [
    ("ResNet", 1.7e6, 60_000, 600_000),
    ("Wide ResNet", 11e6, 60_000, 600_000),
    ("DenseNet (k = 12)", 1e6, 60_000, 600_000),
    ("DenseNet (k = 24)", 27.2e6, 60_000, 600_000),
]
"""Fioresi et al., Table 1, as printed: (architecture, d, N on CIFAR, N on SVHN)."""

TRAINING_N = {"CIFAR": 50_000, "SVHN": 73_257, "SVHN with extra": 604_388}
"""The training sets' sizes. Table 1's CIFAR N of 60,000 counts the 10,000 test images too
(D is a covariance over training samples: 50,000); its SVHN N of 600,000 is the training
set with the 531,131 "extra" images, 604,388 in all."""


def size_row(
    model: str, dataset: str, options: dict[str, Any] | None = None, source: str = ""
) -> dict[str, Any]:
    """d, N and the rank bound min(d, N − 1) of ``model`` on ``dataset``."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    if dataset not in DATASET_SIZES:
        raise ConfigError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASET_SIZES)}")
    shape, n, classes = DATASET_SIZES[dataset]
    with torch.device("meta"):  # shapes only: no memory, however wide the model
        net = build_model(model, shape, classes, **(options or {}))
    d = sum(p.numel() for p in net.parameters())
    return {
        "model": model,
        "options": dict(options or {}),
        "dataset": dataset,
        "d": d,
        "N": n,
        "rank_bound": min(d, n - 1),
        "d_over_N": d / n,
        "source": source,
    }


def size_table(
    model: str | None = None, dataset: str | None = None, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows for the papers' models, or the one row of ``model`` on ``dataset``."""
    if model is not None or dataset is not None:
        if model is None or dataset is None:
            raise ConfigError("give both --model and --dataset, or neither")
        return [size_row(model, dataset, options, "by name")]
    return [size_row(*entry) for entry in PAPER_MODELS]


def format_table(rows: list[dict[str, Any]], quoted: bool = True) -> str:
    """The table the CLI prints, with the paper's quoted rows below."""
    lines = [
        f"{'model':<26} {'dataset':<14} {'d':>13} {'N':>9} {'rank bound':>11} {'d/N':>8}  where",
    ]
    for row in rows:
        options = ",".join(f"{k}={v}" for k, v in row["options"].items())
        name = f"{row['model']}({options})" if options else row["model"]
        lines.append(
            f"{name:<26} {row['dataset']:<14} {row['d']:>13,} {row['N']:>9,} "
            f"{row['rank_bound']:>11,} {row['d_over_N']:>8.1f}  {row['source']}"
        )
    if quoted:
        lines += ["", "Fioresi et al., Table 1 (quoted): d, N on CIFAR, N on SVHN"]
        for name, d, n_cifar, n_svhn in QUOTED_TABLE1:
            lines.append(f"{name:<26} {d / 1e6:>6.1f} M {n_cifar:>9,} {n_svhn:>9,}")
        sizes = ", ".join(f"{name} {n:,}" for name, n in TRAINING_N.items())
        lines.append(f"training sets: {sizes} (the quoted CIFAR N counts the test set too)")
    return "\n".join(lines)


class Table1Config(BaseModel):
    """The options of ``sgdgeom table1``: a model by name on a dataset, or neither (the
    papers' models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="A model name.")
    dataset: str | None = Field(None, description="A dataset name.")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="KEY=VALUE model option, repeatable (depth=3).",
        json_schema_extra={"flag": "--model-option"},
    )


def _run(config: Table1Config, context: RunContext) -> dict[str, Any]:
    rows = size_table(config.model, config.dataset, config.model_options)
    return {"rows": rows, "quoted": config.model is None}


def _no_figures(out: Path) -> list[Path]:
    return []


KIND = register_kind(
    ExperimentKind(
        name="table1",
        help="Fioresi et al.'s Table 1: d, N and the rank bound of D for the papers' models, "
        "or for any model by name (no data is read).",
        config=Table1Config,
        run=_run,
        summary=lambda result: format_table(result["rows"], quoted=result["quoted"]),
        plots=_no_figures,
        source="options",
        out=None,
    )
)
