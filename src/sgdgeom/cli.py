"""The ``sgdgeom`` command.

Bad input (a config key, a dataset file, a data root, ...) ends with a one-line
``sgdgeom: error: ...`` message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from sgdgeom._deprecated import SgdgeomDeprecationWarning, warn
from sgdgeom.errors import SgdgeomError
from sgdgeom.experiments.config import parse_yaml
from sgdgeom.experiments.kinds import KINDS, ExperimentKind, RunContext, check_out, claim_out
from sgdgeom.files import safe_name

app = typer.Typer(
    name="sgdgeom",
    help="The geometry of SGD noise in weight space: diffusion matrices, diffusion metrics, "
    "layer temperatures and partial local entropy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no type names beside flags
)


def _print_version(value: bool) -> None:
    if value:
        from sgdgeom import __version__

        typer.echo(f"sgdgeom {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """The geometry of SGD noise in weight space."""


DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Directory holding the dataset files (mnist/, "
        "fashion-mnist/, cifar-10-batches-py/, stl10_binary/).",
    ),
]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or auto; overrides the config.")
]


@app.command()
def datasets(data_root: DataRoot = None) -> None:
    """List the datasets, where each comes from, and whether it is available now."""
    from sgdgeom.data import DATASETS, load_dataset
    from sgdgeom.errors import DatasetError, DatasetMissingError

    typer.echo(f"{'name':<14} {'available':<10} {'description'}")
    for spec in DATASETS.values():
        problem = ""
        root = None if spec.embedded else spec.root(data_root)
        if spec.embedded:
            status = "offline"
        elif root is None:
            status = "no root"
        else:
            try:
                load_dataset(spec.name, data_root)
                status = "yes"
            except DatasetMissingError:
                status = "missing"
            except DatasetError as err:
                status, problem = "corrupt", str(err)
        typer.echo(f"{spec.name:<14} {status:<10} {spec.description}")
        if problem:
            typer.echo(f"{'':<25} {problem}")
        if status == "yes":
            typer.echo(f"{'':<25} found in {root}")
        if not spec.embedded:
            typer.echo(f"{'':<25} files: {spec.layout}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="An experiment config (YAML).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory; default runs/NAME.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")
    ] = False,
    data_root: DataRoot = None,
    device: Device = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train one config; write metrics.jsonl, checkpoint.pt and final.json to the run dir."""
    from sgdgeom.experiments.config import load_config
    from sgdgeom.experiments.runner import run_training

    cfg = load_config(config)
    out_dir = out if out is not None else Path("runs") / safe_name(cfg.name)
    final = run_training(
        cfg, out_dir, resume=resume, data_root=data_root, device=device, progress=progress
    )
    typer.echo(json.dumps(final, indent=2))
    typer.echo(f"results in {out_dir}")


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="A comparison config: base and variants.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory of the variants' runs; default runs/NAME."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue killed variants.")] = False,
    data_root: DataRoot = None,
    device: Device = None,
) -> None:
    """Run variants of one experiment (e.g. optimizers) and plot their curves together."""
    from sgdgeom.experiments.compare import load_comparison, run_comparison

    name, _ = load_comparison(config)
    out_dir = out if out is not None else Path("runs") / safe_name(name)
    summary = run_comparison(config, out_dir, resume=resume, data_root=data_root, device=device)
    typer.echo(f"{'variant':<20} {'final acc':>10} {'best acc':>10} {'final loss':>11}")
    for variant, final in summary["variants"].items():
        typer.echo(
            f"{variant:<20} {final['final_test_acc']:>10.4f} "
            f"{final['best_test_acc']:>10.4f} {final['final_train_loss']:>11.4f}"
        )
    typer.echo(f"results in {out_dir} (summary.json, curves.png)")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="A sweep config: base, variants, grid, plots.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Sweep directory (results.sqlite, runs/); default runs/NAME."),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (a process pool) or ray.")
    ] = "local",
    workers: Annotated[int, typer.Option("--workers", help="Runs at a time.")] = 1,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (default: start a local Ray)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads per run (default: cores/workers).")
    ] = None,
    gpus_per_run: Annotated[
        float, typer.Option("--gpus-per-run", help="GPUs each Ray task reserves.")
    ] = 0.0,
    yes: Annotated[bool, typer.Option("--yes", help="Run a grid of more than 2,000 runs.")] = False,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE: change a base key for every run (e.g. train.epochs=1758); the "
            "sweep's name and default folder record it. Repeatable.",
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="GLOB: run only the runs whose names match (e.g. 'plea_R=0.01_*'); they join "
            "the sweep's store. Repeatable.",
        ),
    ] = None,
    data_root: DataRoot = None,
    device: Device = None,
) -> None:
    """Run a grid of runs into a resumable SQLite store; plot it and write a report.

    Run it again after a kill: finished runs are skipped, unfinished ones resume from their
    checkpoints. With --only, the runs left out stay as they are in the store.
    """
    from sgdgeom.experiments.config import load_yaml_as
    from sgdgeom.experiments.report import write_report
    from sgdgeom.experiments.sweep import (
        MAX_RUNS,
        SweepConfig,
        expand_sweep,
        override_base,
        run_sweep,
        select_runs,
    )

    sweep_config = override_base(load_yaml_as(SweepConfig, config), assignments or [], str(config))
    out_dir = out if out is not None else Path("runs") / safe_name(sweep_config.name)
    spec = expand_sweep(sweep_config, out_dir, str(config), max_runs=None if yes else MAX_RUNS)
    spec = select_runs(spec, only or [])
    typer.echo(f"sweep {spec.name}: {len(spec.runs)} runs into {out_dir}")
    result = run_sweep(
        spec,
        out_dir,
        engine=engine,
        workers=workers,
        address=address,
        threads=threads,
        gpus_per_run=gpus_per_run,
        data_root=data_root,
        device=device,
    )
    asked = {run.hash for run in spec.runs}  # a store's other runs are not this call's failures
    failed = [r for r in result["runs"] if r["hash"] in asked and r["status"] != "finished"]
    report = write_report(out_dir, figures=Path(out_dir) / "figures")
    typer.echo(f"report: {report}")
    if failed:
        for run in failed:
            typer.echo(f"not finished: {run['name']}: {run['error'] or run['status']}", err=True)
        raise typer.Exit(1)


@app.command()
def merge(
    source: Annotated[
        Path,
        typer.Argument(
            help="A sweep directory made elsewhere (results.sqlite, runs/), or a run archive "
            "that sgdgeom archive wrote."
        ),
    ],
    into: Annotated[
        Path, typer.Option("--into", help="The sweep directory to merge into (made if missing).")
    ],
) -> None:
    """Copy the finished runs of a sweep directory made elsewhere (a GPU machine, another
    computer), or of a run archive, into another, under the same config hashes; then
    rewrite its report.

    A run already finished there is kept (and named where its final metrics differ); one
    unfinished there is replaced, checkpoint and all; a folder holding another config's run
    is refused before anything is written.
    """
    from sgdgeom.experiments.merge import merge_store
    from sgdgeom.experiments.report import write_report

    summary = merge_store(source, into)
    typer.echo(
        f"merged {len(summary.merged)} finished runs into {into}; {len(summary.kept)} were "
        f"finished there already, {len(summary.unfinished)} unfinished in {source} left out"
    )
    for name in summary.merged:
        typer.echo(f"  {name}")
    if summary.differing:
        typer.echo(
            f"{len(summary.differing)} of the runs finished in both differ in their final "
            f"metrics (kept as {into} has them):"
        )
        for name in summary.differing:
            typer.echo(f"  {name}")
    typer.echo(f"report: {write_report(into, figures=Path(into) / 'figures')}")


@app.command()
def archive(
    source: Annotated[Path, typer.Argument(help="A sweep directory (results.sqlite, runs/).")],
    out: Annotated[
        Path, typer.Option("--out", help="The archive file to write (xz-compressed JSON).")
    ],
) -> None:
    """Pack a sweep's finished runs (rows, epochs, run files but checkpoints) into one
    small file to commit; sgdgeom merge restores them on another machine."""
    from sgdgeom.experiments.archive import write_archive

    names = write_archive(source, out)
    size = out.stat().st_size
    typer.echo(f"archived {len(names)} finished runs of {source} into {out} ({size:,} bytes)")
    typer.echo(f"restore them with: sgdgeom merge {out} --into {source}")


@app.command()
def report(
    source: Annotated[Path, typer.Argument(help="A results.sqlite or the directory holding it.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file; default report.html beside the store.")
    ] = None,
) -> None:
    """A self-contained HTML page with the figures and tables of a sweep's store."""
    from sgdgeom.experiments.report import write_report

    typer.echo(f"report: {write_report(source, out)}")


# --------------------------------------------------------------------------- experiment kinds


_ANNOTATED: Any = Annotated  # the parameters' types are made at run time, from the fields


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """The command-line parameter of one field of a kind's config: ``--field-name`` (or the
    field's own ``flag``), a switch for a bool, repeatable ``KEY=VALUE`` for a mapping, a
    positional argument where the field says so. Absent, it leaves the field's default;
    the value is checked by the config model, which names what is allowed."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    annotation = _unwrap(field.annotation)
    if extra.get("positional"):
        argument = _ANNOTATED[Path, typer.Argument(help=field.description)]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=argument)
    flag = str(extra.get("flag", "--" + name.replace("_", "-")))
    if annotation is bool:
        flags = [f"{flag}/--no-{flag[2:]}"]
    else:
        flags = [flag]
        annotation = {int: int, float: float, Path: Path}.get(annotation, str)
        if typing.get_origin(_unwrap(field.annotation)) is dict:
            annotation = list[str]
    option = _ANNOTATED[annotation | None, typer.Option(*flags, help=field.description)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)


def _parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a mapping of YAML values."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SgdgeomError(f"option {pair!r} is not KEY=VALUE (e.g. depth=3)")
        options[key] = parse_yaml(value, f"option {pair!r}")
    return options


def _kind_command(kind: ExperimentKind[Any], old_name: str | None = None) -> None:
    """Register the subcommand of an experiment kind on :data:`app`: ``CONFIG`` (a YAML file)
    or one parameter per field of its config, and ``--out`` where it writes to a folder of
    its own; it runs the kind and prints its summary. ``old_name``: a name kept for one
    release (a hidden command that warns)."""
    fields = kind.config.model_fields
    params = (
        [
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[Path, typer.Argument(help="The config (YAML).")],
            )
        ]
        if kind.source == "file"
        else [_parameter(name, field) for name, field in fields.items()]
    )
    if kind.out is not None:
        where = f"Where it writes; default {kind.out.format(name='NAME')}."
        params.append(
            inspect.Parameter(
                "out",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Path | None, typer.Option("--out", help=where)],
            )
        )

    def run(**given: Any) -> None:
        if old_name is not None:
            warn(f"sgdgeom {old_name}", f"sgdgeom {kind.name}")
        out = given.pop("out", None)
        if kind.source == "file":
            config = kind.load(given["config"])
        else:
            values = {n: v for n, v in given.items() if v is not None}
            for name, value in values.items():
                if typing.get_origin(_unwrap(fields[name].annotation)) is dict:
                    values[name] = _parse_pairs(value)
            config = kind.parse(values, f"sgdgeom {kind.name}")
        target = kind.out_dir(config, out)
        if target is not None:
            check_out(target, kind.name, config)
        log = functools.partial(typer.echo, err=True)
        summary = kind.summary(kind.run(config, RunContext(target, True, log)))
        if target is not None:
            claim_out(target, kind.name, config)
        typer.echo(summary)
        if target is not None and kind.source == "file":
            typer.echo(f"results in {target}")

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    name = old_name or kind.name
    app.command(name, help=kind.help, hidden=old_name is not None)(run)


def _kind_commands() -> None:
    """One subcommand per registered experiment kind, and one per old name of a kind."""
    import sgdgeom.experiments  # noqa: F401 (registers the kinds)

    for _, kind in KINDS.items():
        _kind_command(kind)
    for old, new in KINDS.aliases().items():
        _kind_command(KINDS[new], old_name=old)


_kind_commands()


def _show_deprecations() -> None:
    """sgdgeom's deprecation warnings as one line each on stderr (``sgdgeom: warning: ...``);
    other warnings as Python shows them."""
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, SgdgeomDeprecationWarning):
            typer.echo(f"sgdgeom: warning: {message}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    warnings.simplefilter("default", SgdgeomDeprecationWarning)


def main() -> None:
    """Entry point: run the app, turning sgdgeom's errors, and the operating system's (a
    full disk, a folder without write permission), into one-line messages with exit
    status 2; an old spelling is named in a one-line warning."""
    _show_deprecations()
    try:
        app()
    except (SgdgeomError, OSError) as err:
        typer.echo(f"sgdgeom: error: {' '.join(str(err).split())}", err=True)
        sys.exit(2)
    except SystemExit as stop:  # typer ends a Ctrl-C (or a sweep's SIGTERM) with status 130
        if stop.code == 130 and _interrupted(stop):
            typer.echo("sgdgeom: interrupted; finished epochs and runs are kept", err=True)
        raise


def _interrupted(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt lies in ``error``'s chain of causes and contexts."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    main()
