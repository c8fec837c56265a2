"""A model and data to measure, as the measuring commands (``sgdgeom spectrum``,
``sgdgeom noise``) take them: a named model at its seed's initialisation, or the weights of
a training checkpoint (its run folder's config names the model and the dataset), and the
first ``n`` training samples, normalised as the run normalised them (``data.normalize``);
and the kind of such a command
(:func:`measuring_kind`): a report as JSON, a figure drawn from the JSON alone, a table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from sgdgeom.data import load_dataset
from sgdgeom.errors import ConfigError, SgdgeomError
from sgdgeom.experiments.config import parse_config, read_yaml
from sgdgeom.experiments.kinds import ExperimentKind, RunContext
from sgdgeom.files import atomic_write_bytes, load_checkpoint
from sgdgeom.models import build_model
from sgdgeom.train import resolve_device

__all__ = [
    "Measured",
    "MeasuredConfig",
    "load_measured",
    "measured_options",
    "measuring_kind",
    "write_json_and_plot",
]


class MeasuredConfig(BaseModel):
    """The options that choose what a measuring command measures (:func:`load_measured`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="A model name, e.g. fc, cnn-cifar10.")
    dataset: str | None = Field(None, description="A dataset name, e.g. mnist5k.")
    checkpoint: Path | None = Field(
        None,
        description="A checkpoint.pt from `sgdgeom train`; its run's config names the model "
        "and dataset.",
    )
    n: int | None = Field(None, description="Use the first N training samples (default: all).")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="KEY=VALUE model option, repeatable (depth=3).",
        json_schema_extra={"flag": "--model-option"},
    )
    seed: int = Field(0, description="Seed of the initialisation without a checkpoint.")
    data_root: Path | None = Field(
        None, description="Directory holding the dataset files (see `sgdgeom datasets`)."
    )
    device: str = Field("auto", description="cpu, cuda or auto.")
    float32: bool = Field(False, description="Compute in float32 instead of float64.")


@dataclass
class Measured:
    """The model (in eval mode, on its device and in its dtype), the samples and their
    names."""

    model: nn.Module
    x: Tensor
    y: Tensor
    model_name: str
    dataset_name: str
    model_options: dict[str, Any]
    checkpoint: str | None


def load_measured(
    model_name: str | None,
    dataset_name: str | None,
    *,
    n: int | None = None,
    checkpoint: str | Path | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Measured:
    """Load what to measure (see the module doc); a bad name, a sample count outside
    ``2..N`` or a checkpoint of another model is refused with the reason."""
    weights, config = None, None
    if checkpoint:
        state = load_checkpoint(Path(checkpoint))  # weights only: never unpickles code
        weights = state.get("model", state)
        config_path = Path(checkpoint).parent / "config.yaml"
        config = read_yaml(config_path) if config_path.is_file() else None
    options = dict(model_options or {})
    normalize = True
    if config is not None:
        run = parse_config(config, f"{checkpoint} config")
        model_name = model_name or run.model.name
        dataset_name = dataset_name or run.data.name
        options = {**run.model.options, **options}
        normalize = run.data.normalize
    if model_name is None or dataset_name is None:
        raise ConfigError(
            "name a model and a dataset (--model, --dataset), or a --checkpoint "
            "from `sgdgeom train`"
        )
    dataset = load_dataset(dataset_name, data_root)
    if not normalize:  # the run saw raw inputs (data.normalize: false): so does D
        dataset = dataset.raw()
    if n is not None and not 2 <= n <= len(dataset.y_train):
        raise ConfigError(f"--n must be in 2..{len(dataset.y_train)} for {dataset_name}, got {n}")
    torch.manual_seed(seed)
    model = build_model(model_name, dataset.input_shape, dataset.num_classes, **options)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise SgdgeomError(
                f"checkpoint {checkpoint} does not fit model {model_name!r}: "
                f"{str(err).splitlines()[0]}"
            ) from None
    target = resolve_device(device)
    x = dataset.normalize(dataset.x_train[:n]).to(target, dtype)
    return Measured(
        model.to(target, dtype).eval(),
        x,
        dataset.y_train[:n].to(target),
        model_name,
        dataset_name,
        options,
        str(checkpoint) if checkpoint else None,
    )


def measured_options(config: MeasuredConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`load_measured` (and of the reports built on it) that
    a command's config holds."""
    return {
        "n": config.n,
        "checkpoint": config.checkpoint,
        "model_options": config.model_options,
        "data_root": config.data_root,
        "device": config.device,
        "dtype": torch.float32 if config.float32 else torch.float64,
        "seed": config.seed,
    }


def write_json_and_plot(
    report: dict[str, Any],
    out_dir: str | Path,
    stem: str,
    plot: Callable[[dict[str, Any], Path], Path],
) -> tuple[Path, Path]:
    """Write ``STEM.json`` (atomically) and ``STEM.png``, drawn from the JSON just written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    atomic_write_bytes(json_path, json.dumps(report, indent=1).encode())
    return json_path, plot(json.loads(json_path.read_text()), out / f"{stem}.png")


ConfigType = TypeVar("ConfigType", bound=MeasuredConfig)


def measuring_kind(
    name: str,
    help: str,
    config: type[ConfigType],
    measure: Callable[[ConfigType, RunContext], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], Path],
) -> ExperimentKind:
    """The experiment kind of a measuring command: one flag per config field, the report
    ``measure`` makes written as ``NAME.json`` and ``NAME.png`` under ``--out``
    (``runs/NAME``), ``table`` printed."""

    def run(options: ConfigType, context: RunContext) -> dict[str, Any]:
        assert context.out is not None
        report = measure(options, context)
        written = write_json_and_plot(report, context.out, name, plot)
        return {**report, "written": [str(path) for path in written]}

    def summary(report: dict[str, Any]) -> str:
        written = report.get("written", [])
        return table(report) + (f"\n\nwrote {' and '.join(written)}" if written else "")

    return ExperimentKind(
        name=name,
        help=help,
        config=config,
        run=run,
        summary=summary,
        plots=lambda out: [
            plot(json.loads((out / f"{name}.json").read_text()), out / f"{name}.png")
        ],
        source="options",
        out=f"runs/{name}",
    )
