"""The ``sgdgeom`` command.

Bad input (a config key, a dataset file, a data root, ...) ends with a one-line
``sgdgeom: error: ...`` message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sgdgeom.errors import SgdgeomError
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
        if spec.embedded:
            status = "offline"
        elif data_root is None:
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
def temperatures(
    run_dir: Annotated[Path, typer.Argument(help="A run directory trained with a monitor.")],
) -> None:
    """Musso's Fig. 1 and the regime analysis of a run, from its metrics.jsonl."""
    from sgdgeom.experiments.runner import write_temperature_report

    if not (run_dir / "metrics.jsonl").is_file():
        raise SgdgeomError(f"{run_dir} has no metrics.jsonl: train it with `monitor:` first")
    try:
        analysis = write_temperature_report(run_dir, title=run_dir.name)
    except ValueError as err:
        raise SgdgeomError(
            f"{run_dir}: {err}; train it with `monitor: {{temperature: true}}`"
        ) from None
    typer.echo(json.dumps(analysis, indent=2))
    typer.echo(f"wrote {run_dir / 'regimes.json'} and {run_dir / 'temperatures.png'}")


@app.command()
def rbm(
    config: Annotated[Path, typer.Argument(help="An RBM config (YAML).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Results directory; default runs/NAME.")
    ] = None,
) -> None:
    """Train RBMs by plain CD and by the diffusion-metric update; plot log-likelihoods."""
    from sgdgeom.experiments.rbm import load_rbm_config, run_rbm

    cfg = load_rbm_config(config)
    out_dir = out if out is not None else Path("runs") / safe_name(cfg.name)
    summary = run_rbm(cfg, out_dir)
    typer.echo(f"{'update':<14} {'test LL':>10} {'best test':>10} {'train LL':>10}")
    for update, row in summary["updates"].items():
        typer.echo(
            f"{update:<14} {row['test_loglik']:>10.3f} {row['best_test_loglik']:>10.3f} "
            f"{row['train_loglik']:>10.3f}"
        )
    typer.echo(f"results in {out_dir} (summary.json, loglik.png, spectrum.png)")


@app.command()
def geodesic(
    config: Annotated[Path, typer.Argument(help="A geodesic experiment config (YAML).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Results directory; default runs/NAME.")
    ] = None,
) -> None:
    """Geodesics, metric flows and GD against SGD ensembles, with the dropped terms."""
    from sgdgeom.experiments.geodesic import load_geodesic_config, run_geodesic

    cfg = load_geodesic_config(config)
    out_dir = out if out is not None else Path("runs") / safe_name(cfg.name)
    result = run_geodesic(cfg, out_dir)
    table = result.get("tracking_table") or [
        {"model": k, "mean_distance_to_sgd_mean": v}
        for k, v in result["distance_to_sgd_mean"].items()
    ]
    typer.echo(f"{'model':<28} {'mean distance to the SGD mean':>30}")
    for row in table:
        typer.echo(f"{row['model']:<28} {row['mean_distance_to_sgd_mean']:>30.5f}")
    typer.echo(f"results in {out_dir}")


@app.command("steady-state")
def steady_state(
    config: Annotated[Path, typer.Argument(help="A steady-state experiment config (YAML).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Results directory; default runs/NAME.")
    ] = None,
) -> None:
    """Where SGD settles on a two-parameter problem, against exp(−βf), exp(−βΦ) (F11) and
    the Chaudhari–Soatto SDE: total variation distances with error bars."""
    from sgdgeom.experiments.steady_state import load_steady_state_config, run_steady_state

    cfg = load_steady_state_config(config)
    out_dir = out if out is not None else Path("runs") / safe_name(cfg.name)
    result = run_steady_state(cfg, out_dir)
    typer.echo(f"{'density':<40} {'TV to the SGD histogram':>26}")
    for name, d in result["distances"].items():
        typer.echo(f"{name:<40} {d['tv']:>16.4f} ± {d['stderr']:.4f}")
    floor = result["sampling_floor"]
    typer.echo(
        f"sampling floor: {floor['sample_vs_density']:.4f} against a density, "
        f"{floor['sample_vs_sample']:.4f} between two samples"
    )
    if not result["potential_exists"]:
        typer.echo(
            f"no Φ with ∇Φ = ∇_D f: the curl of ∇_D f reaches "
            f"{result['curl_relative_max']:.3g} of its derivatives"
        )
    typer.echo(f"results in {out_dir}")


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
    data_root: DataRoot = None,
    device: Device = None,
) -> None:
    """Run a grid of runs into a resumable SQLite store; plot it and write a report.

    Run it again after a kill: finished runs are skipped, unfinished ones resume from their
    checkpoints.
    """
    from sgdgeom.experiments.config import load_yaml_as
    from sgdgeom.experiments.report import write_report
    from sgdgeom.experiments.sweep import (
        MAX_RUNS,
        SweepConfig,
        expand_sweep,
        override_base,
        run_sweep,
    )

    sweep_config = override_base(load_yaml_as(SweepConfig, config), assignments or [], str(config))
    out_dir = out if out is not None else Path("runs") / safe_name(sweep_config.name)
    spec = expand_sweep(sweep_config, out_dir, str(config), max_runs=None if yes else MAX_RUNS)
    typer.echo(f"sweep {spec.name}: {len(spec.runs)} runs into {out_dir}")
    result = run_sweep(
        spec,
        out_dir,
        engine=engine,  # type: ignore[arg-type]
        workers=workers,
        address=address,
        threads=threads,
        gpus_per_run=gpus_per_run,
        data_root=data_root,
        device=device,
    )
    failed = [r for r in result["runs"] if r["status"] != "finished"]
    report = write_report(out_dir)
    typer.echo(f"report: {report}")
    if failed:
        for run in failed:
            typer.echo(f"not finished: {run['name']}: {run['error'] or run['status']}", err=True)
        raise typer.Exit(1)


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


@app.command()
def table1(
    model: Annotated[str | None, typer.Option("--model", help="A model name.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="A dataset name.")] = None,
    model_option: Annotated[
        list[str] | None,
        typer.Option("--model-option", help="KEY=VALUE model option, repeatable (depth=3)."),
    ] = None,
) -> None:
    """Fioresi et al.'s Table 1: d, N and the rank bound of D for the papers' models, or
    for any model by name (no data is read)."""
    from sgdgeom.experiments.table1 import format_table, size_table

    rows = size_table(model, dataset, _parse_options(model_option or []))
    typer.echo(format_table(rows, quoted=model is None))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where everything goes.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of each training.")] = 5,
    n_train: Annotated[
        int | None, typer.Option("--n-train", help="Train on the first N samples only.")
    ] = None,
    spectrum_n: Annotated[
        int, typer.Option("--spectrum-n", help="Samples in the diffusion matrix.")
    ] = 1000,
    sgd_runs: Annotated[
        int, typer.Option("--sgd-runs", help="SGD runs averaged in the geodesic panel.")
    ] = 32,
) -> None:
    """The main job on embedded data: SGD, PLA and DiffusionMetricSGD on MNIST-5k, the
    diffusion spectrum, layer temperatures, a geodesic, and an HTML report."""
    from sgdgeom.experiments.demo import run_demo

    path = run_demo(out, epochs=epochs, n_train=n_train, spectrum_n=spectrum_n, sgd_runs=sgd_runs)
    typer.echo(f"report: {path}")


def _parse_options(pairs: list[str]) -> dict[str, object]:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SgdgeomError(f"model option {pair!r} is not KEY=VALUE (e.g. depth=3)")
        options[key] = yaml.safe_load(value)
    return options


@app.command()
def spectrum(
    model: Annotated[
        str | None, typer.Option("--model", help="A model name, e.g. fc, cnn-cifar10.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="A dataset name, e.g. mnist5k.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="A checkpoint.pt from `sgdgeom train`; its run's config names the "
            "model and dataset.",
        ),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Use the first N training samples (default: all).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Where spectrum.json and spectrum.png go.")
    ] = Path("runs/spectrum"),
    model_option: Annotated[
        list[str] | None,
        typer.Option("--model-option", help="KEY=VALUE model option, repeatable (depth=3)."),
    ] = None,
    float32: Annotated[
        bool,
        typer.Option(
            "--float32", help="Compute in float32: faster, but it resolves far fewer eigenvalues."
        ),
    ] = False,
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            help="Only the top k eigenpairs, from products (no N x N matrix): for large N.",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(help="With --k: block-lanczos, randomized, or lanczos (one vector a pass)."),
    ] = "block-lanczos",
    hessian: Annotated[
        bool,
        typer.Option(
            "--hessian", help="With --k: the Hessian's top k too, and its alignment with D."
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Keep captures that do not fit in memory in memory-mapped files here.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation without a checkpoint.")] = 0,
    data_root: DataRoot = None,
    device: Device = None,
) -> None:
    """The diffusion matrix's size, rank, spectrum and per-layer traces (Fioresi et al., F3);
    with --k its top k by block methods, and with --hessian its alignment with the Hessian."""
    import torch

    from sgdgeom.experiments.spectrum import format_report, spectrum_report, write_report

    report = spectrum_report(
        model,
        dataset,
        n=n,
        checkpoint=checkpoint,
        model_options=_parse_options(model_option or []),
        data_root=data_root,
        device=device or "auto",
        dtype=torch.float32 if float32 else torch.float64,
        seed=seed,
        k=k,
        method=method,
        hessian=hessian,
        cache_dir=cache_dir,
        log=lambda line: typer.echo(line, err=True),
    )
    typer.echo(format_report(report))
    json_path, plot_path = write_report(report, out)
    typer.echo(f"\nwrote {json_path} and {plot_path}")


def main() -> None:
    """Entry point: run the app, turning sgdgeom's errors, and the operating system's (a
    full disk, a folder without write permission), into one-line messages with exit
    status 2."""
    try:
        app()
    except (SgdgeomError, OSError) as err:
        typer.echo(f"sgdgeom: error: {' '.join(str(err).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("sgdgeom: interrupted; finished epochs and runs are kept", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
