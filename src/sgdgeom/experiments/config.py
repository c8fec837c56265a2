"""Experiment configs: YAML validated by pydantic.

A config is a mapping with the sections ``data``, ``model``, ``optimizer`` and ``train``
(see :class:`ExperimentConfig`). Every key is checked: an unknown key or a bad value is a
:class:`~sgdgeom.errors.ConfigError` that names the key and what is allowed.

Examples:
    >>> cfg = parse_config({
    ...     "name": "demo", "data": {"name": "digits"}, "model": {"name": "mlp"},
    ...     "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 1}})
    >>> cfg.model.options
    {}
    >>> parse_config({"name": "x", "data": {"name": "digits", "bs": 1},
    ...     "model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.1},
    ...     "train": {"epochs": 1}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sgdgeom.errors.ConfigError: config: data.bs: unknown key; allowed: ...
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sgdgeom.data import AUGMENTATION_DATASETS, AUGMENTATIONS, DATASETS
from sgdgeom.errors import ConfigError
from sgdgeom.models import MODELS

__all__ = [
    "OPTIMIZER_KEYS",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimizerConfig",
    "TrainConfig",
    "config_hash",
    "load_config",
    "load_yaml_as",
    "parse_config",
    "read_yaml",
    "resume_key",
]


class _Strict(BaseModel):
    """Unknown keys are refused, and values are not coerced (``epochs: true`` is no 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Strict):
    """Which dataset, how it is batched and augmented."""

    name: str
    batch_size: int = Field(64, ge=1)
    test_batch_size: int = Field(1000, ge=1)
    augment: str | None = None
    n_train: int | None = Field(None, ge=1)
    n_test: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
        return name

    @model_validator(mode="after")
    def _augmentation_of_the_dataset(self) -> DataConfig:
        name = self.augment
        if name is None:
            return self
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; allowed: {', '.join(AUGMENTATIONS)}")
        meant_for = AUGMENTATION_DATASETS[name]
        if self.name not in meant_for:
            raise ValueError(
                f"augmentation {name!r} is made for {' or '.join(meant_for)}, not {self.name}"
            )
        return self


def _model_options(name: str) -> list[str]:
    params = inspect.signature(MODELS[name]).parameters
    return [p for p in params if p not in ("input_shape", "num_classes")]


class ModelConfig(_Strict):
    """A model of :data:`sgdgeom.models.MODELS` and its options (``depth``, ``width``,
    ``activation``, ...), written beside ``name`` in the YAML."""

    name: str
    init: Literal["default", "kaiming"] = "default"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "options" in data:
            return data
        name = data.get("name")
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
        allowed = _model_options(name)
        options = {k: v for k, v in data.items() if k not in ("name", "init")}
        for key in options:
            if key not in allowed:
                raise ValueError(
                    f"unknown key {key!r} for model {name!r}; allowed: "
                    f"{', '.join(['name', 'init', *allowed])}"
                )
        return {"name": name, "init": data.get("init", "default"), "options": options}


OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "adam": (),
    "adamw": (),
    "diffusion-sgd": ("eps", "mode", "safety", "fused"),
    "sam": ("rho",),
    "asam": ("rho",),
    "entropy-sgd": ("L", "gamma", "gamma_growth", "langevin_lr", "noise", "alpha"),
}
"""The keys each optimizer accepts beyond ``lr``, ``momentum``, ``weight_decay``, ``nesterov``."""


class OptimizerConfig(_Strict):
    """The optimizer and the baselines every table compares against:

    - ``sgd`` (plain, momentum, weight decay), ``adam``, ``adamw`` (decoupled weight decay);
    - ``diffusion-sgd``: :class:`~sgdgeom.optim.DiffusionMetricSGD` (``eps``, ``mode``,
      ``safety``, ``fused``);
    - ``sam`` / ``asam``: SAM and adaptive SAM from the pytorch-optimizer package over SGD
      (``rho``, default 0.05 / 0.5);
    - ``entropy-sgd``: :class:`~sgdgeom.optim.entropy_sgd.EntropySGD` (``L``, ``gamma``,
      ``gamma_growth``, ``langevin_lr``, ``noise``, ``alpha``). Defaults, against Chaudhari
      et al.'s Algorithm 1 and the defaults of their public code: ``langevin_lr`` η' = 0.1,
      ``noise`` ε = 1e-4 (the thermal noise of the inner SGLD) and ``alpha`` α = 0.75 (the
      weight of the inner iterates' running mean μ) are theirs; ``gamma`` γ₀ = 0.03 and
      ``gamma_growth`` γ₁ = 1e-3 where their code has 1e-2 and 0 (scoping, §4.3 of the
      paper, is off there by default); ``L`` = 5 inner steps where their code's default is
      0 and their experiments set 5 to 20.
    """

    name: Literal["sgd", "adam", "adamw", "diffusion-sgd", "sam", "asam", "entropy-sgd"]
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False
    eps: float | Literal["auto"] | None = None
    mode: Literal["weak", "exact"] | None = None
    safety: float | None = Field(None, gt=0, lt=1)
    fused: bool | None = None
    rho: float | None = Field(None, gt=0)
    L: int | None = Field(None, ge=1)
    gamma: float | None = Field(None, gt=0)
    gamma_growth: float | None = Field(None, ge=0)
    langevin_lr: float | None = Field(None, gt=0)
    noise: float | None = Field(None, ge=0)
    alpha: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _keys_of_the_named_optimizer(self) -> OptimizerConfig:
        own = OPTIMIZER_KEYS[self.name]
        foreign = [
            key
            for keys in OPTIMIZER_KEYS.values()
            for key in keys
            if key not in own and getattr(self, key) is not None
        ]
        if foreign:
            owners = sorted({n for n, keys in OPTIMIZER_KEYS.items() if set(foreign) & set(keys)})
            raise ValueError(
                f"{', '.join(dict.fromkeys(foreign))} apply only to name: {' or '.join(owners)}"
            )
        if isinstance(self.eps, float) and not 0 <= self.eps < math.inf:
            raise ValueError(f"eps must be 'auto' or a finite number >= 0, got {self.eps}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class TrainConfig(_Strict):
    """How long to train and where."""

    epochs: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MonitorConfig(_Strict):
    """Instruments switched on during training (:class:`~sgdgeom.monitor.LayerTemperature`).

    ``temperature``: per-layer signal and noise (Musso eq. 2, Fig. 1); ``snr``: gradient
    signal-to-noise norms; ``trace_every``: epochs between ``tr D_I / N_I`` measurements on
    the first ``probe_size`` training samples (0 = never); ``layers``: which layers (default
    all with a weight matrix); ``tensorboard``: also write TensorBoard scalars (needs the
    tensorboard package). ``current_every``: epochs between measurements of Fioresi et al.'s
    (F12) current and the curl of ∇_D f on the probe samples
    (:class:`~sgdgeom.steady_state.SteadyStateMonitor`; 0 = never), with
    ``current_probes`` Hutchinson probes for ∇·D (null: exact) and ``curl_sections`` random
    sections. ``alignment_every``: epochs between measurements of the alignment of D with
    the Hessian on the probe samples (:class:`~sgdgeom.hessian.AlignmentMonitor`; 0 =
    never), on the top ``alignment_k`` eigenpairs of each.
    """

    temperature: bool = True
    snr: bool = False
    trace_every: int = Field(0, ge=0)
    probe_size: int = Field(256, ge=2)
    layers: list[str] | None = None
    tensorboard: bool = False
    current_every: int = Field(0, ge=0)
    current_probes: int | None = Field(8, ge=2)
    curl_sections: int = Field(4, ge=0)
    alignment_every: int = Field(0, ge=0)
    alignment_k: int = Field(5, ge=1)


class LossConfig(_Strict):
    """The training loss: plain cross-entropy, or Musso's partial local entropy smoothing
    ``layers`` (``pla``: eq. 23, ``plea``: eq. 22; a finite ``k`` gives eq. 19 / 14) with
    box half-side ``R``, or the Gaussian distance ``gamma ‖ΔW‖²`` of eq. 11 instead, and
    ``y`` perturbed points, optionally as ``antithetic`` pairs ``±ΔW`` (see
    :class:`~sgdgeom.optim.local_entropy.PartialLocalEntropy`)."""

    name: Literal["cross_entropy", "pla", "plea"] = "cross_entropy"
    layers: list[str] | Literal["all"] | None = None
    R: float | None = Field(None, gt=0)
    gamma: float | None = Field(None, gt=0)
    y: int | None = Field(None, ge=0)
    k: float | None = Field(None, gt=0)
    route: Literal["auto", "naive", "prefix", "split"] | None = None
    antithetic: bool | None = None

    @model_validator(mode="after")
    def _entropy_keys(self) -> LossConfig:
        keys = ("layers", "R", "gamma", "y", "k", "route", "antithetic")
        extra = [k for k in keys if getattr(self, k) is not None]
        if self.name == "cross_entropy" and extra:
            raise ValueError(f"{', '.join(extra)} apply only to name: pla or plea")
        if self.name != "cross_entropy" and (self.R is None) == (self.gamma is None):
            raise ValueError(
                f"loss {self.name} needs exactly one of R (the half-side of the sampling box) "
                f"and gamma (the Gaussian distance of Musso eq. 11)"
            )
        if self.k is not None and self.gamma is not None:
            raise ValueError("k sharpens the box kernel; the Gaussian distance (gamma) has none")
        return self


class ExperimentConfig(_Strict):
    """One training run: dataset, model, optimizer and schedule, plus a seed and, optionally,
    monitors."""

    name: str
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    monitor: MonitorConfig | None = None
    loss: LossConfig = Field(default_factory=LossConfig)

    @model_validator(mode="after")
    def _diffusion_sgd_combinations(self) -> ExperimentConfig:
        if self.optimizer.name == "diffusion-sgd" and self.loss.name != "cross_entropy":
            raise ValueError(
                f"optimizer diffusion-sgd reads the per-sample gradients of one forward and "
                f"backward, and loss {self.loss.name} makes y + 1 of them: use one or the other"
            )
        reads_grad = self.monitor is not None and self.monitor.temperature
        if self.optimizer.fused and reads_grad:
            raise ValueError(
                "optimizer.fused leaves the weights' .grad empty, and monitor.temperature reads "
                "it: set optimizer.fused: false or monitor.temperature: false"
            )
        if self.optimizer.name == "diffusion-sgd" and self.optimizer.fused is None and reads_grad:
            # the default, fused where exact, would hide the .grad that the monitor reads
            unfused = self.optimizer.model_copy(update={"fused": False})
            return self.model_copy(update={"optimizer": unfused})
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` (the location of an unknown key) in ``model``."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            models = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = models[0] if len(models) == 1 else None
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format(err: ValidationError, source: str, schema: type[BaseModel] = ExperimentConfig) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(schema, loc))
            lines.append(f"{where}: unknown key; allowed: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing key")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping as an :class:`ExperimentConfig`, or raise a :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (else the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML file, or a :class:`ConfigError` naming the file (missing,
    unreadable, not YAML, or with a key given twice)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


Schema = TypeVar("Schema", bound=BaseModel)


def load_yaml_as(schema: type[Schema], path: str | Path) -> Schema:
    """Read a YAML file and validate it as ``schema``, or raise a :class:`ConfigError` that
    names the file and every bad key (for the experiment kinds with their own schema)."""
    try:
        return schema.model_validate(read_yaml(path))
    except ValidationError as err:
        raise ConfigError(_format(err, str(path), schema)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), str(path))


def config_hash(config: ExperimentConfig) -> str:
    """A short stable hash of the config's content (the key of the result store)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_key(config: ExperimentConfig) -> str:
    """The hash of what a checkpoint's state depends on: the whole config but for
    ``train.epochs`` and ``train.device``, so that a run may be resumed to train longer or
    on another device, and never under another model, data, optimizer, loss or seed."""
    data = config.model_dump(mode="json")
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("epochs", "device")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
