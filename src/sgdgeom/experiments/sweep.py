"""Sweeps: a grid over any config keys, run on a local process pool or on Ray, recorded in
a resumable :class:`~sgdgeom.experiments.store.ResultStore`.

A sweep config is a ``base`` experiment config, optional named ``variants`` (partial
configs merged into the base, as in :mod:`~sgdgeom.experiments.compare`), and a ``grid``
of dotted keys to lists of values. A variant may carry its own ``grid``, which is crossed
with the top-level one (e.g. an R × layers grid for PLA, seeds for every variant)::

    name: musso-4.2
    base: {data: {...}, model: {...}, optimizer: {...}, train: {...}}
    variants:
      none: {}
      pla:
        loss: {name: pla, y: 4}
        grid: {loss.layers: [[fc1], [fc2], [fc1, fc2]], loss.R: [0.001, 0.01, 0.1]}
    grid: {seed: [0, 1]}
    plots:
      - {kind: versus, x: loss.R, lines: loss.layers}
      - {kind: curves}

``override_base`` (``sgdgeom sweep --set train.epochs=1758``) changes a base key for every
run, e.g. to train a published sweep longer, and appends the change to the sweep's name.

Every run is validated before anything trains. A run is identified by the hash of its
whole config; its directory is ``OUT/runs/NAME`` and its rows live in ``OUT/results.sqlite``.
Running a sweep again skips finished runs and resumes unfinished ones from their last
checkpoint, so a killed sweep loses at most the epoch in progress of each running run.

Engines: ``local`` (a process pool, the default, or in-process with one worker) and
``ray`` (Ray tasks on a local instance or at a cluster address; the workers must see
``OUT`` on a shared filesystem). Each run gets ``threads`` CPU threads in either engine,
so the same seeds give the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from itertools import product
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator
from tqdm.auto import tqdm

from sgdgeom.callbacks import Loop
from sgdgeom.data import load_dataset
from sgdgeom.errors import ConfigError
from sgdgeom.experiments.compare import merge
from sgdgeom.experiments.config import config_hash, load_yaml_as, parse_config
from sgdgeom.experiments.plots import PlotOptions, plot_options
from sgdgeom.experiments.plots.curves import CurvesOptions
from sgdgeom.experiments.runner import run_training
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.extras import require
from sgdgeom.files import refuse_links, safe_name
from sgdgeom.registry import Registry
from sgdgeom.train import Callback

__all__ = [
    "ENGINES",
    "MAX_RUNS",
    "RunSpec",
    "Sweep",
    "SweepConfig",
    "execute_run",
    "expand_sweep",
    "load_sweep",
    "override_base",
    "run_sweep",
    "select_runs",
]

MAX_RUNS = 2000
"""Grids larger than this are refused unless asked for (``--yes``)."""


def _one_variant() -> dict[str, dict[str, Any] | None]:
    return {"base": {}}


def _curves() -> list[PlotOptions]:
    return [CurvesOptions()]


class SweepConfig(BaseModel):
    """The YAML of a sweep (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any] | None] = Field(default_factory=_one_variant)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    plots: list[SerializeAsAny[PlotOptions]] = Field(default_factory=_curves)

    @field_validator("plots", mode="before")
    @classmethod
    def _registered_kinds(cls, value: Any) -> Any:
        """Each entry as the options model of its ``kind``
        (:data:`~sgdgeom.experiments.plots.PLOTS`)."""
        if not isinstance(value, list):
            return value
        return [plot_options(entry) for entry in value]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its hash, unique name, labels (variant and grid values), the
    validated config as plain data, and its run directory."""

    hash: str
    name: str
    labels: dict[str, Any]
    config: dict[str, Any]
    run_dir: str

    def as_row(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "name": self.name,
            "labels": self.labels,
            "config": self.config,
            "run_dir": self.run_dir,
        }


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its name, runs and plots."""

    name: str
    runs: list[RunSpec]
    plots: list[PlotOptions] = field(default_factory=list)


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    node = config
    for part in path:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"key {key!r}: {part!r} is not a section")
        node = child
    node[last] = copy.deepcopy(value)


def _is_set(config: dict[str, Any], key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def override_base(
    config: SweepConfig, assignments: list[str], source: str = "sweep"
) -> SweepConfig:
    """``config`` with each ``KEY=VALUE`` (a dotted key, a YAML value) set in its base, and
    the assignments appended to its name (so its default folder is its own).

    A key that a grid sweeps or a variant sets is refused: the override would not reach
    every run. An unknown key is refused when the runs are validated.

    Examples:
        >>> config = SweepConfig(name="s", base={"train": {"epochs": 120}})
        >>> longer = override_base(config, ["train.epochs=1758"])
        >>> longer.name, longer.base["train"]["epochs"]
        ('s@train.epochs=1758', 1758)
    """
    base = copy.deepcopy(config.base)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not re.fullmatch(r"\w+(\.\w+)*", key):
            raise ConfigError(
                f"{source}: --set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=1758"
            )
        for variant, (override, grid) in _variant_grids(config, source).items():
            if key in grid or _is_set(override, key):
                whose = "a grid sweeps" if key in grid else f"variant {variant!r} sets"
                raise ConfigError(
                    f"{source}: --set {key}: {whose} that key, so the override would not reach "
                    f"every run; edit the config instead"
                )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{source}: --set {key}: {text!r} is not a YAML value: {err}"
            ) from None
        _set_dotted(base, key, value)
    name = "@".join([config.name, *assignments])
    return config.model_copy(update={"base": base, "name": name})


def _label(value: Any) -> Any:
    """A grid value as a label: lists of layer names read ``fc1+fc2``."""
    if isinstance(value, list):
        return "+".join(map(str, value))
    return value


def _grid_points(grid: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _run_name(variant: str, point: dict[str, Any]) -> str:
    parts = [variant] + [f"{k.split('.')[-1]}={_label(v)}" for k, v in point.items()]
    return "_".join(parts)


def _variant_grids(config: SweepConfig, source: str) -> dict[str, tuple[dict[str, Any], dict]]:
    """Each variant's override (without its grid) and its grid crossed with the top one."""
    out = {}
    for variant, override in config.variants.items():
        override = dict(override or {})
        own_grid = override.pop("grid", {}) or {}
        if not isinstance(own_grid, dict):
            raise ConfigError(f"{source}: variant {variant!r}: grid must map keys to lists")
        out[variant] = (override, {**own_grid, **config.grid})
    return out


def expand_sweep(
    config: SweepConfig,
    out_dir: str | Path,
    source: str = "sweep",
    max_runs: int | None = MAX_RUNS,
) -> Sweep:
    """Every run of a sweep config, each validated as an experiment config; runs with
    identical configs are run once.

    A grid of more than ``max_runs`` points is refused before anything is built (pass
    ``None``, or ``--yes`` on the command line, to run it anyway). Run names become folder
    names through :func:`~sgdgeom.files.safe_name`; two runs whose names give one folder
    are refused.
    """
    grids = _variant_grids(config, source)
    for variant, (_, grid) in grids.items():
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"{source} variant {variant!r}: grid key {key!r} needs a non-empty list "
                    f"of values"
                )
    total = sum(math.prod(len(v) for v in grid.values()) for _, grid in grids.values())
    if max_runs is not None and total > max_runs:
        raise ConfigError(
            f"{source}: the grid has {total:,} runs, more than {max_runs:,}; check it, and "
            f"pass --yes to run it anyway"
        )
    runs: dict[str, RunSpec] = {}
    folders: dict[str, str] = {}
    for variant, (override, grid) in grids.items():
        for point in _grid_points(grid):
            label = _run_name(variant, point)
            name = safe_name(label)
            data = merge(config.base, override)
            for key, value in point.items():
                _set_dotted(data, key, value)
            data["name"] = f"{config.name}/{name}"
            experiment = parse_config(data, f"{source} run {name!r}")
            run_hash = config_hash(experiment)
            if run_hash in runs:
                continue
            if name in folders:
                raise ConfigError(
                    f"{source}: runs {folders[name]!r} and {label!r} both become the folder "
                    f"runs/{name}; rename a variant"
                )
            folders[name] = label
            runs[run_hash] = RunSpec(
                hash=run_hash,
                name=name,
                labels={"variant": variant} | {k: _label(v) for k, v in point.items()},
                config=experiment.model_dump(mode="json"),
                run_dir=str(Path(out_dir) / "runs" / name),
            )
    labels = {key for run in runs.values() for key in run.labels}
    for plot in config.plots:
        for label in plot.labels():
            if label not in labels:
                raise ConfigError(
                    f"{source}: plot {plot.kind} {label!r}: no run has that label; the labels "
                    f"are {', '.join(sorted(labels))}"
                )
    return Sweep(config.name, list(runs.values()), list(config.plots))


def select_runs(sweep: Sweep, patterns: Sequence[str]) -> Sweep:
    """The runs of ``sweep`` whose names match any of the shell-style ``patterns``
    (``sgdgeom sweep --only 'plea_R=0.01_*'``), in the sweep's order; no patterns keep every
    run. A pattern that matches no run is refused, with the run names, rather than quietly
    running fewer runs than asked for. The selected runs have the sweep's hashes and
    folders, so they join its store and a later run of the whole sweep skips them.

    Examples:
        >>> names = ["none_seed=0", "pla_R=0.1_seed=0", "pla_R=0.01_seed=0"]
        >>> runs = [RunSpec(name, name, {}, {}, f"runs/{name}") for name in names]
        >>> [run.name for run in select_runs(Sweep("demo", runs), ["pla_R=0.1_*"]).runs]
        ['pla_R=0.1_seed=0']
    """
    if not patterns:
        return sweep
    names = [run.name for run in sweep.runs]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(
                f"--only {pattern!r} matches no run of sweep {sweep.name!r}; its runs are {shown}"
            )
    runs = [run for run in sweep.runs if any(fnmatchcase(run.name, p) for p in patterns)]
    return dataclasses.replace(sweep, runs=runs)


def load_sweep(path: str | Path, out_dir: str | Path, max_runs: int | None = MAX_RUNS) -> Sweep:
    """Read, validate and expand a sweep config file."""
    return expand_sweep(load_yaml_as(SweepConfig, path), out_dir, str(path), max_runs)


class StoreRecorder(Callback):
    """Writes a run's progress to the store: the attempt's start (and the epoch it resumes
    from), then every epoch's metrics as soon as the epoch ends."""

    def __init__(self, store: ResultStore, run_hash: str) -> None:
        self.store = store
        self.run_hash = run_hash

    def on_train_begin(self, trainer: Loop) -> None:
        self.store.start(self.run_hash, resumed_from=trainer.epoch)

    def on_epoch_end(self, trainer: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        self.store.record_epoch(self.run_hash, metrics)


def execute_run(
    spec: RunSpec,
    store_path: str,
    *,
    data_root: str | None = None,
    device: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Train one run of a sweep (resuming from its checkpoint if it has one) and record it
    in the store. A failing run is recorded as failed, with its reason, and returned as
    such; it does not stop the sweep. This is what a worker process or a Ray task runs."""
    store = ResultStore(store_path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        final = run_training(
            parse_config(spec.config, spec.name),
            spec.run_dir,
            resume=True,
            data_root=data_root,
            device=device,
            callbacks=[StoreRecorder(store, spec.hash)],
            progress=False,
        )
    except Exception as err:  # any failure of one run is recorded; the sweep goes on
        return _failed(store, spec, err)
    finally:
        torch.set_num_threads(previous_threads)
    store.finish(spec.hash, final)
    seconds = time.perf_counter() - start
    return {"hash": spec.hash, "status": "finished", "final": final, "seconds": seconds}


def _failed(store: ResultStore, spec: RunSpec, err: BaseException) -> dict[str, Any]:
    """Record a failed run with the exception's type and message, as one line."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    store.fail(spec.hash, reason)
    return {"hash": spec.hash, "status": "failed", "error": reason}


def _init_worker(parent: int) -> None:
    """In a pool worker: end the process as soon as ``parent`` (the sweep) is gone, so that a
    killed sweep leaves no worker training queued runs. A Ctrl-C at the terminal reaches
    the whole process group: the workers ignore it, and the sweep stops them itself. The
    progress bars lock with a thread lock: tqdm's default, a multiprocessing lock, is a
    semaphore that a worker stopped by the sweep never releases, and the resource tracker
    warns of it as "leaked" when the sweep exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="sgdgeom-parent-watch").start()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a sweep runs, a SIGTERM (``kill PID``, a scheduler's stop) stops it as a Ctrl-C
    does: the queued runs never start, the running ones stop, and the store marks them
    interrupted. A sweep started in the background from a script has SIGINT ignored, so
    there SIGTERM is the way to stop it. Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


Runner = Callable[[list[RunSpec], Callable[[RunSpec, dict[str, Any]], None]], None]


def _local_engine(
    workers: int, options: dict[str, Any], address: str | None, gpus_per_run: float
) -> Runner:
    """A process pool of ``workers`` (in-process with one); ``address`` and
    ``gpus_per_run`` are Ray's."""

    def run(pending: list[RunSpec], report: Callable[[RunSpec, dict[str, Any]], None]) -> None:
        if workers == 1:
            for spec in pending:
                report(spec, execute_run(spec, **options))
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )
        try:
            futures = {pool.submit(execute_run, spec, **options): spec for spec in pending}
            for future in as_completed(futures):
                spec = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # the worker died (killed, out of memory)
                    result = _failed(ResultStore(options["store_path"]), spec, err)
                report(spec, result)
        except KeyboardInterrupt:  # no queued run starts; the running ones stop now
            workers_now = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in workers_now:
                process.terminate()
            raise
        pool.shutdown()

    return run


def _ray_engine(
    workers: int, options: dict[str, Any], address: str | None, gpus_per_run: float
) -> Runner:
    """Ray tasks on a local instance or at ``address``, each reserving ``gpus_per_run``."""
    ray = require("ray", "the ray engine")

    def run(pending: list[RunSpec], report: Callable[[RunSpec, dict[str, Any]], None]) -> None:
        started_here = not ray.is_initialized()
        if started_here:
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                init["num_cpus"] = workers
            ray.init(address=address, **init)
        try:
            task = ray.remote(num_cpus=1, num_gpus=gpus_per_run, max_retries=0)(execute_run)
            refs = {task.remote(spec, **options): spec for spec in pending}
            # ray.init installs its own SIGTERM handler, which exits at once: the sweep's
            # again, so that a stop marks the runs interrupted; the tasks are cancelled,
            # since a cluster at an address outlives this process
            with _sigterm_as_interrupt():
                try:
                    while refs:  # a short wait, so that a signal is seen within it
                        done, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
                        for ref in done:
                            report(refs.pop(ref), ray.get(ref))
                except KeyboardInterrupt:
                    for ref in refs:
                        ray.cancel(ref, force=True)
                    # a cancel is carried out by Ray's raylet: wait until the tasks are
                    # gone, so that none writes after the store marks them interrupted
                    if refs:
                        ray.wait(list(refs), num_returns=len(refs), timeout=60)
                    raise
        finally:
            if started_here:
                ray.shutdown()

    return run


ENGINES: Registry[Callable[[int, dict[str, Any], str | None, float], Runner]] = Registry("engine")
"""Where a sweep's runs execute: ``local`` (a process pool) or ``ray``."""
ENGINES.register("local", _local_engine)
ENGINES.register("ray", _ray_engine)


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    *,
    engine: str = "local",
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    gpus_per_run: float = 0.0,
    data_root: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every unfinished run of ``sweep`` and return the store's rows for it.

    Every dataset the runs read is loaded once first, so that a missing one stops the
    sweep with one message before anything starts. ``threads`` (CPU threads per run)
    defaults to the CPU count divided by ``workers``. Progress is a bar and one line per
    finished run.
    """
    if workers < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"workers and threads must be >= 1, got {workers} and {threads}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    for name in sorted({spec.config["data"]["name"] for spec in sweep.runs}):
        load_dataset(name, data_root)  # a missing dataset stops the sweep here, once
    out = Path(out_dir)
    store = ResultStore(out / STORE)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    options = {
        "store_path": str(out / STORE),
        "data_root": str(data_root) if data_root else None,
        "device": device,
        "threads": threads,
    }
    runner = ENGINES[engine](workers, options, address, gpus_per_run)
    with store.exclusive():
        store.register(
            sweep.name,
            [spec.as_row() for spec in sweep.runs],
            [plot.model_dump() for plot in sweep.plots],
        )
        status = {row["hash"]: row["status"] for row in store.runs(sweep.name)}
        pending = [spec for spec in sweep.runs if status.get(spec.hash) != "finished"]
        for spec in pending:
            refuse_links(spec.run_dir, out, "run folder")
        done = len(sweep.runs) - len(pending)
        with tqdm(
            total=len(sweep.runs), initial=done, disable=not progress, desc=sweep.name, unit="run"
        ) as bar:
            if done and progress:
                tqdm.write(f"{done} of {len(sweep.runs)} runs already finished; skipping them")

            def report(spec: RunSpec, result: dict[str, Any]) -> None:
                bar.update(1)
                if not progress:
                    return
                if result["status"] == "finished":
                    final = result["final"]
                    tqdm.write(
                        f"finished {spec.name}: best acc {final['best_test_acc']:.4f}, final "
                        f"acc {final['final_test_acc']:.4f} ({result['seconds']:.0f} s)"
                    )
                else:
                    tqdm.write(f"FAILED {spec.name}: {result['error']}")

            try:
                with _sigterm_as_interrupt():
                    runner(pending, report)
            except KeyboardInterrupt:
                store.interrupt([spec.hash for spec in pending])
                raise
    return {"name": sweep.name, "runs": store.runs(sweep.name)}
