"""Experiment configs: YAML validated by pydantic.

A config is a mapping with the sections ``data``, ``model``, ``optimizer`` and ``train``
(see :class:`ExperimentConfig`), and optionally ``loss`` and ``monitor``. Every key is
checked: an unknown key or a bad value is a :class:`~sgdgeom.errors.ConfigError` that names
the key and what is allowed. The ``optimizer``, ``loss`` and ``monitor`` sections name
registered things (:data:`~sgdgeom.optim.OPTIMIZERS`, :data:`~sgdgeom.optim.LOSSES`,
:data:`~sgdgeom.monitors.MONITORS`): each is validated as the options model of its name.

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
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from sgdgeom._deprecated import warn
from sgdgeom.data import AUGMENTATION_DATASETS, AUGMENTATIONS, DATASETS
from sgdgeom.errors import ConfigError
from sgdgeom.models import MODELS
from sgdgeom.monitors import MONITORS, MonitorOptions
from sgdgeom.optim import (
    LOSSES,
    OPTIMIZERS,
    LossOptions,
    OptimizerOptions,
    loss_options,
    optimizer_options,
)
from sgdgeom.optim.objectives import CrossEntropyOptions
from sgdgeom.registry import Options, Registry

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "MonitorConfig",
    "TrainConfig",
    "config_hash",
    "parse_yaml",
    "load_config",
    "load_yaml_as",
    "parse_config",
    "read_yaml",
    "resume_key",
]


class DataConfig(Options):
    """Which dataset, how it is batched and augmented."""

    name: str
    batch_size: int = Field(64, ge=1)
    test_batch_size: int = Field(1000, ge=1)
    augment: str | None = None
    n_train: int | None = Field(None, ge=1)
    n_test: int | None = Field(None, ge=1)
    #: the last n_val of the (first n_train) training samples, held out to pick the best
    #: epoch and learning rate on (:meth:`~sgdgeom.data.Dataset.hold_out`)
    n_val: int | None = Field(None, ge=1)
    #: standardise the inputs with the training part's mean and std (false: the stored
    #: pixels in [0, 1], as Musso's protocol feeds them)
    normalize: bool = True

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


class ModelConfig(Options):
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


class TrainConfig(Options):
    """How long to train and where."""

    epochs: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


_OLD_MONITOR_KEYS = (
    "snr",
    "trace_every",
    "layers",
    "current_every",
    "current_probes",
    "curl_sections",
    "alignment_every",
    "alignment_k",
)


def _old_monitor_section(data: dict[str, Any]) -> dict[str, Any]:
    """A ``monitor:`` section in the flat form of the previous release (``temperature:
    true, snr: true, current_every: 1, ...``, the temperature on unless switched off) in
    today's form, one section per monitor, with a deprecation warning."""
    warn(
        "the flat monitor section (snr, trace_every, current_every, ...)",
        "one section per monitor, e.g. monitor: {temperature: {snr: true}, current: {every: 1}}",
        stacklevel=7,
    )

    def given(*pairs: tuple[str, str]) -> dict[str, Any]:
        return {new: data[old] for old, new in pairs if old in data}

    out: dict[str, Any] = given(("probe_size", "probe_size"))
    if data.get("temperature", True):
        out["temperature"] = given(
            ("snr", "snr"), ("trace_every", "trace_every"), ("layers", "layers")
        )
    if data.get("current_every"):
        out["current"] = given(
            ("current_every", "every"), ("current_probes", "probes"), ("curl_sections", "sections")
        )
    if data.get("alignment_every"):
        out["alignment"] = given(("alignment_every", "every"), ("alignment_k", "k"))
    if data.get("tensorboard"):
        out["tensorboard"] = {}
    return out


class MonitorConfig(Options):
    """The monitors switched on during training (:mod:`sgdgeom.monitors`), by name, each with
    its options (``true`` for its defaults, ``false`` or absent for off), and the shared
    ``probe_size``: the first training samples that the probe measurements use::

        monitor:
          probe_size: 1024
          temperature: {snr: true, trace_every: 50}
          current: {every: 1}

    The flat form of the previous release (``temperature: true, snr: true,
    current_every: 1, ...``) is read for one release, with a warning.
    """

    probe_size: int = Field(256, ge=2)
    monitors: dict[str, SerializeAsAny[MonitorOptions]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _one_section_per_monitor(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "monitors" in data:
            return data
        if set(_OLD_MONITOR_KEYS) & set(data):
            data = _old_monitor_section(data)
        monitors = {}
        for name, value in data.items():
            if name == "probe_size" or value is False:
                continue
            if name not in MONITORS:
                raise ValueError(
                    f"unknown monitor {name!r}; known: probe_size, {', '.join(MONITORS)}"
                )
            monitors[MONITORS.resolve(name)] = {} if value is True else value
        return {k: v for k, v in data.items() if k == "probe_size"} | {"monitors": monitors}

    @field_validator("monitors", mode="wrap")
    @classmethod
    def _registered(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict):
            return handler(value)
        out = {}
        for name, options in value.items():
            model = MONITORS[name]
            if isinstance(options, model):
                out[name] = options
                continue
            try:
                out[name] = model.model_validate(options if options is not None else {})
            except ValidationError as err:
                lines = describe_errors(err, model, options)
                raise ValueError("; ".join(f"{name}.{line}" for line in lines)) from None
        return out

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        dumped = handler(self)
        return {"probe_size": dumped["probe_size"], **dumped["monitors"]}

    @property
    def reads_grad(self) -> bool:
        """Whether a monitor switched on reads the weights' ``.grad`` after backward."""
        return any(options.reads_grad for options in self.monitors.values())


class ExperimentConfig(Options):
    """One training run: dataset, model, optimizer and schedule, plus a seed and, optionally,
    a training loss and monitors."""

    name: str
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataConfig
    model: ModelConfig
    optimizer: SerializeAsAny[OptimizerOptions]
    train: TrainConfig
    monitor: MonitorConfig | None = None
    loss: SerializeAsAny[LossOptions] = Field(default_factory=CrossEntropyOptions)

    @field_validator("optimizer", mode="wrap")
    @classmethod
    def _registered_optimizer(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return optimizer_options(value)

    @field_validator("loss", mode="wrap")
    @classmethod
    def _registered_loss(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return loss_options(value)

    @model_validator(mode="after")
    def _sections_together(self) -> ExperimentConfig:
        reads_grad = self.monitor is not None and self.monitor.reads_grad
        optimizer = self.optimizer.alongside(type(self.loss).plain, reads_grad)
        return (
            self
            if optimizer is self.optimizer
            else self.model_copy(update={"optimizer": optimizer})
        )


_SECTIONS: dict[type[Options], Registry[Any]] = {OptimizerOptions: OPTIMIZERS, LossOptions: LOSSES}


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...], data: Any) -> list[str]:
    """The keys allowed at ``loc`` (the location of an unknown key) in ``model``, whose input
    was ``data``; a registered section's keys are those of the model of its name."""
    for part in loc[:-1]:
        data = data.get(part) if isinstance(data, dict) else None
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            models = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = models[0] if len(models) == 1 else None
        if typing.get_origin(annotation) is typing.Annotated:  # SerializeAsAny[...]
            annotation = typing.get_args(annotation)[0]
        if (
            annotation in _SECTIONS
            and isinstance(data, dict)
            and data.get("name") in (registry := _SECTIONS[annotation])
        ):
            annotation = registry[data["name"]]
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_errors(err: ValidationError, schema: type[BaseModel], data: Any = None) -> list[str]:
    """One line per error of ``err`` (raised validating ``data`` as ``schema``): the dotted
    key and what is wrong, an unknown key with the keys allowed there."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc if p != "monitors") or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(schema, loc, data))
            lines.append(f"{where}: unknown key; allowed: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing key")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = "" if isinstance(item.get("input"), dict) else f" (got {item.get('input')!r})"
            lines.append(f"{where}: {message}{shown}")
    return lines


def _format(err: ValidationError, source: str, schema: type[BaseModel], data: Any) -> str:
    return f"{source}: " + "; ".join(describe_errors(err, schema, data))


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping as an :class:`ExperimentConfig`, or raise a :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source, ExperimentConfig, data)) from None


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


# YAML 1.2's floats: ``1e-3`` and ``1e308`` are numbers (YAML 1.1, PyYAML's default, wants
# a dot and a signed exponent, ``1.0e-3``, and reads ``1e-3`` as a string)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

YAML_VALUES = 100_000
"""The most values a config may expand to (aliases counted each time they are used)."""
YAML_DEPTH = 64
"""The deepest nesting of mappings and lists a config may have."""


def _check_size(data: Any, source: str) -> None:
    """Refuse a loaded YAML document that expands to more than :data:`YAML_VALUES` values,
    nests deeper than :data:`YAML_DEPTH` (an alias bomb, a hostile file) or holds a value
    that is not plain data (a ``!!set``, ``!!binary``, a date), walking it without
    recursion and stopping at the first problem."""
    stack, seen = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > YAML_VALUES:
            raise ConfigError(
                f"{source}: the config expands to more than {YAML_VALUES:,} values (aliases "
                f"counted where used); a config is small: is this the right file?"
            )
        if depth > YAML_DEPTH:
            raise ConfigError(f"{source}: the config nests deeper than {YAML_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif not isinstance(value, str | int | float | bool | None):
            raise ConfigError(
                f"{source}: a {type(value).__name__} ({str(value)[:40]!r}) is not config "
                f"data: use numbers, strings (quote a date), booleans, null, lists, mappings"
            )


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML file, or a :class:`ConfigError` naming the file (missing,
    unreadable, not YAML, with a key given twice, nested too deep or expanding to too many
    values). Floats are read as YAML 1.2 reads them (``lr: 1e-3`` is a number)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as text ({err})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as :func:`read_yaml` reads a file (``source`` names it in errors)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nests deeper than {YAML_DEPTH} levels") from None
    _check_size(data, source)
    return data


Schema = TypeVar("Schema", bound=BaseModel)


def load_yaml_as(schema: type[Schema], path: str | Path) -> Schema:
    """Read a YAML file and validate it as ``schema``, or raise a :class:`ConfigError` that
    names the file and every bad key (for the experiment kinds with their own schema)."""
    data = read_yaml(path)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, str(path), schema, data)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), str(path))


def _content(config: ExperimentConfig) -> dict[str, Any]:
    """The config as data for its hashes; without a validation part and with standardised
    inputs it is what it was before ``data.n_val`` and ``data.normalize`` existed, so older
    runs keep their hashes."""
    data = config.model_dump(mode="json")
    if data["data"].get("n_val") is None:
        del data["data"]["n_val"]
    if data["data"].get("normalize") is True:
        del data["data"]["normalize"]
    return data


def config_hash(config: ExperimentConfig) -> str:
    """A short stable hash of the config's content (the key of the result store)."""
    text = json.dumps(_content(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_key(config: ExperimentConfig) -> str:
    """The hash of what a checkpoint's state depends on: the whole config but for
    ``train.epochs`` and ``train.device``, so that a run may be resumed to train longer or
    on another device, and never under another model, data, optimizer, loss or seed."""
    data = _content(config)
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("epochs", "device")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
