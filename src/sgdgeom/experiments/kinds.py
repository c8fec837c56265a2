"""Experiment kinds: each one module exporting its config model, its run, its summary and its
plots, registered under the name of its ``sgdgeom`` subcommand.

An :class:`ExperimentKind` is what the command line needs to run it, and nothing of how it
runs: the CLI makes one subcommand per registered kind in a loop
(:func:`sgdgeom.cli.kind_command`), whose arguments come from the kind's config model
(``source="file"``: one YAML file validated as the model; ``source="options"``: one flag per
field). Adding an experiment is a module that ends in ``register_kind(ExperimentKind(...))``
and one import line in :mod:`sgdgeom.experiments`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import describe_errors, load_yaml_as
from sgdgeom.registry import Registry

__all__ = [
    "CLAIM",
    "KINDS",
    "ExperimentKind",
    "RunContext",
    "check_out",
    "claim_out",
    "into_out",
    "register_kind",
]

Config = TypeVar("Config", bound=BaseModel)


@dataclass(frozen=True)
class RunContext:
    """Where a kind writes (``out``; None for a kind that writes nothing), whether it shows
    progress bars, and where its one-line notes go (stderr on the command line)."""

    out: Path | None
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda line: None)


@dataclass(frozen=True)
class ExperimentKind(Generic[Config]):
    """An experiment the command line runs by name.

    Attributes:
        name: the subcommand.
        help: its one-paragraph help.
        config: the pydantic model of its options.
        run: ``(config, context) -> summary``: runs it, writes its files under
            ``context.out`` and returns the summary as data.
        summary: the lines the command prints for a summary.
        plots: ``out -> paths``: draws its figures again from the files a run wrote
            (figures are made from data alone).
        source: ``"file"``: the subcommand takes one YAML config (``CONFIG``) validated as
            ``config``; ``"options"``: one flag per field of ``config``.
        out: the default output folder, ``{name}`` standing for the config's ``name``; None
            for a kind whose output folder is one of its options (or that writes nothing).
    """

    name: str
    help: str
    config: type[Config]
    run: Callable[[Config, RunContext], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    plots: Callable[[Path], list[Path]]
    source: Literal["file", "options"] = "file"
    out: str | None = "runs/{name}"

    def load(self, path: str | Path) -> Config:
        """A YAML config of this kind, validated (``source="file"``)."""
        return load_yaml_as(self.config, path)

    def parse(self, values: dict[str, Any], source: str) -> Config:
        """Options given as values by field (``source="options"``), validated."""
        try:
            return self.config.model_validate(values)
        except ValidationError as err:
            raise ConfigError(
                f"{source}: " + "; ".join(describe_errors(err, self.config, values))
            ) from None

    def out_dir(self, config: Config, given: Path | None) -> Path | None:
        """The output folder: ``given``, else the default (with the config's name)."""
        if given is not None or self.out is None:
            return given
        from sgdgeom.files import safe_name

        return Path(self.out.format(name=safe_name(str(getattr(config, "name", self.name)))))


CLAIM = ".sgdgeom-config.json"
"""The file in an output folder that says which kind and config wrote it."""


def _claim(kind: str, config: BaseModel) -> dict[str, Any]:
    return {"kind": kind, "config": config.model_dump(mode="json")}


def check_out(out: Path, kind: str, config: BaseModel) -> None:
    """Refuse an output folder that another kind or config wrote (its results would be
    overwritten or mixed with these); reads only."""
    import json

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose a folder")
    claim = out / CLAIM
    if not claim.is_file():
        return
    try:
        previous = json.loads(claim.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        previous = None
    if previous != _claim(kind, config):
        raise ConfigError(
            f"{out} holds the results of another {kind} config (or another command): "
            f"choose another --out, or delete that folder to replace them"
        )


def claim_out(out: Path, kind: str, config: BaseModel) -> None:
    """Mark ``out`` as the results of this kind and config (after they were written):
    ``out/.sgdgeom-config.json``, which :func:`check_out` reads."""
    import json

    from sgdgeom.files import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_claim(kind, config), indent=1, sort_keys=True)
    atomic_write_bytes(out / CLAIM, text.encode())


def into_out(
    run: Callable[[Config, Path, bool], dict[str, Any]],
) -> Callable[[Config, RunContext], dict[str, Any]]:
    """A kind's run from a function ``(config, out_dir, progress) -> summary`` that writes
    into its output folder."""

    def run_in(config: Config, context: RunContext) -> dict[str, Any]:
        if context.out is None:
            raise ConfigError("this experiment writes its results to a folder: give one (--out)")
        return run(config, context.out, context.progress)

    return run_in


KINDS: Registry[ExperimentKind[Any]] = Registry("experiment kind")
"""Subcommand names to experiment kinds."""


def register_kind(kind: ExperimentKind[Config]) -> ExperimentKind[Config]:
    """Register an experiment kind under its name; returns it."""
    KINDS.register(kind.name, kind)
    return kind
