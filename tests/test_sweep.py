"""Sweeps, the result store, engines, kill-and-resume, plots and reports."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sgdgeom.errors import ConfigError, SgdgeomError
from sgdgeom.experiments.plots import plot_versus, versus_series
from sgdgeom.experiments.report import write_report
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.experiments.sweep import (
    SweepConfig,
    expand_sweep,
    load_sweep,
    override_base,
    run_sweep,
    select_runs,
)

BASE = {
    "data": {"name": "digits", "batch_size": 32, "n_train": 256, "n_test": 128},
    "model": {"name": "mlp", "widths": [16]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 2, "device": "cpu"},
}

CURVES = [{"kind": "curves"}]

SMALL = {
    "name": "small",
    "base": BASE,
    "variants": {
        "none": {},
        "pla": {"loss": {"name": "pla", "y": 2}, "grid": {"loss.R": [0.01, 0.1]}},
    },
    "grid": {"seed": [0, 1]},
    "plots": [{"kind": "versus", "x": "loss.R", "lines": "loss.layers"}, {"kind": "curves"}],
}


def sweep_file(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def store_content(store: ResultStore) -> dict:
    """What must be equal between two sweeps: every run's identity, status and results,
    and its epoch metrics (wall-clock seconds aside)."""
    return {
        run["hash"]: (
            run["name"],
            run["labels"],
            run["config"],
            run["status"],
            run["final"],
            without_timing(store.epochs(run["hash"])),
        )
        for run in store.runs()
    }


# ---------------------------------------------------------------------- expansion


def test_grid_expands_variants_times_grids_with_labels(tmp_path):
    sweep = expand_sweep(SweepConfig(**SMALL), tmp_path)
    names = [r.name for r in sweep.runs]
    assert names == [
        "none_seed=0",
        "none_seed=1",
        "pla_R=0.01_seed=0",
        "pla_R=0.01_seed=1",
        "pla_R=0.1_seed=0",
        "pla_R=0.1_seed=1",
    ]
    run = sweep.runs[4]
    assert run.labels == {"variant": "pla", "loss.R": 0.1, "seed": 0}
    assert run.config["loss"]["R"] == 0.1 and run.config["loss"]["y"] == 2
    assert run.config["seed"] == 0 and run.config["name"] == "small/pla_R=0.1_seed=0"
    assert run.run_dir == str(tmp_path / "runs" / "pla_R=0.1_seed=0")
    assert len({r.hash for r in sweep.runs}) == 6


def test_a_base_override_reaches_every_run_and_names_the_sweep(tmp_path):
    config = SweepConfig(**SMALL)
    longer = override_base(config, ["train.epochs=5", "optimizer.lr=0.05"])
    assert longer.name == "small@train.epochs=5@optimizer.lr=0.05"
    assert config.base["train"]["epochs"] == 2  # the original is untouched
    runs = expand_sweep(longer, tmp_path).runs
    assert len(runs) == 6
    assert {(r.config["train"]["epochs"], r.config["optimizer"]["lr"]) for r in runs} == {(5, 0.05)}
    assert not {r.hash for r in runs} & {r.hash for r in expand_sweep(config, tmp_path).runs}
    layers = override_base(config, ["model.widths=[8, 8]"]).base["model"]["widths"]
    assert layers == [8, 8]  # values are YAML


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("loss.R=0.3", "a grid sweeps that key"),
        ("seed=4", "a grid sweeps that key"),
        ("loss.y=8", "variant 'pla' sets that key"),
        ("train.epochs", "expected KEY=VALUE"),
        ("train..epochs=3", "expected KEY=VALUE"),
        ("model.widths=[8,", "'\\[8,' is not a YAML value"),
        ("train.epochs.max=3", "'epochs' is not a section"),
    ],
)
def test_a_base_override_that_cannot_reach_every_run_is_refused(assignment, message):
    with pytest.raises(ConfigError, match=message):
        override_base(SweepConfig(**SMALL), [assignment])


def test_a_base_override_of_an_unknown_key_is_refused_when_the_runs_are_validated(tmp_path):
    config = override_base(SweepConfig(**SMALL), ["train.epoch=5"])
    with pytest.raises(ConfigError, match="epoch"):
        expand_sweep(config, tmp_path)


def test_identical_runs_are_run_once(tmp_path):
    data = {**SMALL, "variants": {"a": {}, "b": {}}, "grid": {}, "plots": CURVES}
    names = [r.name for r in expand_sweep(SweepConfig(**data), tmp_path).runs]
    assert len(names) == 2  # different names make different configs
    data = {**SMALL, "variants": {"a": {"grid": {"seed": [0, 0]}}}, "grid": {}, "plots": CURVES}
    assert len(expand_sweep(SweepConfig(**data), tmp_path).runs) == 1


def test_layer_lists_become_readable_labels(tmp_path):
    data = {
        **SMALL,
        "variants": {"pla": {"loss": {"name": "pla", "R": 0.1}}},
        "grid": {"loss.layers": [["fc1"], ["fc1", "fc2"]]},
        "plots": CURVES,
    }
    runs = expand_sweep(SweepConfig(**data), tmp_path).runs
    assert [r.labels["loss.layers"] for r in runs] == ["fc1", "fc1+fc2"]
    assert runs[1].config["loss"]["layers"] == ["fc1", "fc2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": {"optimizer.lrate": [0.1]}}, "optimizer.lrate: unknown key"),
        ({"grid": {"seed": []}}, "needs a non-empty list"),
        ({"grid": {"optimizer.lr": [-1.0]}}, "optimizer.lr"),
        ({"variants": {"x": {"loss": {"name": "pla"}}}}, "needs exactly one of R"),
        (
            {"plots": [{"kind": "versus", "x": "loss.R", "y_range": [0.9, 0.8]}]},
            "low < high",
        ),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tmp_path, change, message):
    path = sweep_file(tmp_path, {**SMALL, **change})
    with pytest.raises(ConfigError, match=message):
        load_sweep(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_sweep_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="gird"):
        load_sweep(sweep_file(tmp_path, {**SMALL, "gird": {}}), tmp_path / "out")


# ---------------------------------------------------------------------- store


def test_store_rows_and_resume_bookkeeping(tmp_path):
    store = ResultStore(tmp_path / STORE)
    row = {"hash": "h", "name": "a", "labels": {"seed": 0}, "config": {"x": 1}, "run_dir": "d"}
    store.register("s", [row], [{"kind": "curves"}])
    store.register("s", [row])  # registering again keeps the row
    edited = {**row, "hash": "h2", "config": {"x": 2}}  # another config, the same folder
    with pytest.raises(ConfigError, match="d already holds a run of another config"):
        store.register("s", [edited])
    assert [r["status"] for r in store.runs("s")] == ["pending"]
    store.start("h", resumed_from=0)
    for epoch in (1, 2, 3):
        store.record_epoch("h", {"epoch": epoch, "test_acc": epoch / 10})
    store.start("h", resumed_from=2)  # epoch 3 was never checkpointed
    assert [r["epoch"] for r in store.epochs("h")] == [1, 2]
    store.record_epoch("h", {"epoch": 3, "test_acc": 0.33})
    store.record_epoch("h", {"epoch": 3, "test_acc": 0.3})  # a repeat replaces
    assert store.epochs("h")[-1] == {"epoch": 3, "test_acc": 0.3}
    store.finish("h", {"best_test_acc": 0.3})
    (run,) = store.runs()
    assert run["status"] == "finished" and run["attempts"] == 2 and run["resumed_from"] == 2
    assert run["final"] == {"best_test_acc": 0.3}
    assert store.sweeps() == {"s": []}


def test_corrupt_store_is_a_clear_error(tmp_path):
    path = tmp_path / STORE
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SgdgeomError, match="not a usable result store"):
        ResultStore(path)


def _write_epochs(path: str, run_hash: str, count: int) -> None:
    store = ResultStore(path)
    for epoch in range(1, count + 1):
        store.record_epoch(run_hash, {"epoch": epoch, "pid": os.getpid()})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / STORE)
    store = ResultStore(path)
    rows = [
        {"hash": f"h{i}", "name": f"r{i}", "labels": {}, "config": {}, "run_dir": "d"}
        for i in range(4)
    ]
    store.register("s", rows)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_write_epochs, args=(path, f"h{i}", 60)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 240
    assert [len(store.epochs(f"h{i}")) for i in range(4)] == [60] * 4


# ---------------------------------------------------------------------- running


def test_sweep_runs_skips_finished_and_reports(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, SMALL), tmp_path / "out")
    result = run_sweep(sweep, tmp_path / "out", threads=1, progress=False)
    assert [r["status"] for r in result["runs"]] == ["finished"] * 6
    store = ResultStore(tmp_path / "out" / STORE)
    first = store_content(store)
    for run in result["runs"]:
        assert len(store.epochs(run["hash"])) == 2
        assert (Path(run["run_dir"]) / "final.json").is_file()
    stamps = {r["hash"]: r["finished"] for r in store.runs()}
    run_sweep(sweep, tmp_path / "out", threads=1, progress=False)
    assert {r["hash"]: r["finished"] for r in store.runs()} == stamps
    assert store_content(store) == first

    report = write_report(tmp_path / "out", figures=tmp_path / "out" / "figures")
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "pla R=0.1" in text and "Groups, best first" in text
    figures = tmp_path / "out" / "figures"
    assert (figures / "small-versus-loss.R.svg").is_file()
    assert (figures / "small-curves.png").is_file()
    zoomed = plot_versus(
        store, "small", "loss.R", "loss.layers", tmp_path / "zoom", y_range=(0.99, 1.0)
    )  # every mean is below the range: each is marked on its lower edge
    assert zoomed[0].stat().st_size > 0


def test_only_selects_runs_by_name_in_the_sweeps_order_and_refuses_a_pattern_matching_none(
    tmp_path,
):
    sweep = load_sweep(sweep_file(tmp_path, SMALL), tmp_path / "out")
    names = [run.name for run in sweep.runs]
    assert select_runs(sweep, []) is sweep
    chosen = select_runs(sweep, ["*_seed=1", "none_*"])  # a union, in the sweep's order
    assert [run.name for run in chosen.runs] == [
        name for name in names if name.endswith("_seed=1") or name.startswith("none_")
    ]
    assert len(chosen.runs) == 4 and chosen.name == sweep.name and chosen.plots == sweep.plots
    assert {run.hash for run in chosen.runs} <= {run.hash for run in sweep.runs}
    assert [run.name for run in select_runs(sweep, ["pla_R=0.1_seed=0"]).runs] == [
        "pla_R=0.1_seed=0"
    ]
    with pytest.raises(ConfigError, match=r"--only 'pla_R=0.5_\*' matches no run.*none_seed=0"):
        select_runs(sweep, ["none_*", "pla_R=0.5_*"])
    with pytest.raises(ConfigError, match="matches no run"):
        select_runs(sweep, ["NONE_*"])  # case counts, as in the run folders' names


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    data = {
        **SMALL,
        "variants": {
            "ok": {},
            "diverges": {
                "model": {"name": "mlp", "activation": "relu"},
                "optimizer": {"lr": 1e12, "momentum": 0.0},
            },
        },
        "grid": {},
        "plots": CURVES,
    }
    sweep = load_sweep(sweep_file(tmp_path, data), tmp_path / "out")
    result = run_sweep(sweep, tmp_path / "out", threads=1, progress=False)
    status = {r["name"]: (r["status"], r["error"]) for r in result["runs"]}
    assert status["ok"] == ("finished", None)
    assert status["diverges"][0] == "failed"
    assert "NonFiniteLossError" in status["diverges"][1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "workers", "engine", "left"),
    [
        ("SIGKILL to the process group", 1, "local", "running"),
        ("SIGTERM to the sweep", 1, "local", "interrupted"),
        ("SIGTERM to the sweep", 2, "local", "interrupted"),
        ("SIGTERM to the sweep", 2, "ray", "interrupted"),
    ],
)
def test_sweep_killed_in_a_run_resumes_exactly(tmp_path, stop, workers, engine, left):
    """Kill a sweep in the middle of a run after one finished; resuming it skips the
    finished run, continues the other from its checkpoint, and ends with the store an
    uninterrupted sweep writes. A SIGTERM (``kill PID``) stops it as a Ctrl-C does: the
    run is marked interrupted and no worker goes on training; a SIGKILL cannot be caught,
    so the run stays marked running until the sweep resumes it."""
    data = {
        "name": "killed",
        "base": {
            **BASE,
            "data": {"name": "digits", "batch_size": 8},
            "model": {"name": "mlp", "widths": [256, 256]},
            "train": {"epochs": 8, "device": "cpu"},
        },
        "variants": {"base": {}},
        "grid": {"seed": [0, 1, 2]},
    }
    path = sweep_file(tmp_path, data)
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "sgdgeom", "sweep", str(path), "--out", str(out), "--threads", "1",
        "--workers", str(workers), "--engine", engine,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    store_path = out / STORE
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if store_path.is_file():
            runs = ResultStore(store_path).runs()
            finished = [r for r in runs if r["status"] == "finished"]
            running = [r for r in runs if r["status"] == "running"]
            if finished and running:
                epochs = len(ResultStore(store_path).epochs(running[0]["hash"]))
                if 2 <= epochs < 7:
                    if stop.startswith("SIGKILL"):
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.send_signal(signal.SIGTERM)
                    stderr = proc.communicate(timeout=60)[1].decode()
                    killed_at = (running[0]["hash"], epochs)
                    break
        time.sleep(0.02)
    assert killed_at is not None, "the sweep was not caught in the middle of a run"
    store = ResultStore(store_path)
    before = {r["hash"]: r for r in store.runs()}
    finished_before = {h for h, r in before.items() if r["status"] == "finished"}
    assert before[killed_at[0]]["status"] == left
    if left == "interrupted":
        assert proc.returncode == 130 and "interrupted" in stderr
        assert "leaked semaphore" not in stderr  # no worker leaves a lock behind
        stopped = {h: len(store.epochs(h)) for h in before}
        time.sleep(1.5)  # no worker outlives the sweep and goes on writing epochs
        assert {h: len(store.epochs(h)) for h in before} == stopped

    sweep = load_sweep(path, out)
    run_sweep(sweep, out, threads=1, progress=False)
    after = {r["hash"]: r for r in store.runs()}
    for run_hash in finished_before:  # not rerun
        assert after[run_hash]["finished"] == before[run_hash]["finished"]
        assert after[run_hash]["attempts"] == 1
    resumed = after[killed_at[0]]
    assert resumed["attempts"] == 2
    assert resumed["resumed_from"] >= 1  # from its checkpoint, not epoch 0
    if engine == "local":  # the pool's workers are terminated at once; Ray's raylet
        # carries out a cancel a moment later, an epoch or two of this small run
        assert resumed["resumed_from"] <= killed_at[1]
    assert all(r["status"] == "finished" for r in after.values())

    reference = tmp_path / "uninterrupted"
    run_sweep(load_sweep(path, reference), reference, threads=1, progress=False)
    assert store_content(store) == store_content(ResultStore(reference / STORE))


def test_ray_engine_stores_what_the_local_engine_stores(tmp_path):
    data = {**SMALL, "grid": {"seed": [0]}}
    path = sweep_file(tmp_path, data)
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_sweep(load_sweep(path, local), local, engine="local", workers=2, threads=1, progress=False)
    run_sweep(load_sweep(path, remote), remote, engine="ray", workers=2, threads=1, progress=False)
    a, b = store_content(ResultStore(local / STORE)), store_content(ResultStore(remote / STORE))
    assert len(a) == 3
    # run directories differ, so compare everything else
    assert a == b


def test_unknown_engine_and_bad_workers(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, SMALL), tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown engine"):
        run_sweep(sweep, tmp_path / "out", engine="dask")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(sweep, tmp_path / "out", workers=0)


def test_report_without_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(SgdgeomError, match="no result store"):
        write_report(tmp_path)


def test_mean_and_error_is_the_standard_error_of_the_mean():
    from sgdgeom.experiments.plots import mean_and_error

    mean, error = mean_and_error([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    assert mean.tolist() == [3.0, 2.0]
    assert error.tolist() == pytest.approx([2.0 / 3**0.5, 0.0])  # std (ddof 1) = 2
    assert mean_and_error([0.7])[1] == 0.0  # one run: no error bar, not NaN


def test_report_cells_keep_small_values_visible():
    """tr D_I / N_I of a trained net (1e-7) once printed as 0.0000 in the demo report."""
    from sgdgeom.experiments.report import _cell

    assert _cell(3.2e-7) == "3.200e-07"
    assert _cell(0.91234) == "0.9123"
    assert _cell(0.0) == "0.0000"
    assert _cell(1.5e6) == "1.500e+06"
    assert _cell(None) == "" and _cell(7) == "7"


def test_versus_lines_and_baselines_keep_variants_apart():
    def run(variant, seed, value, **labels):
        final = {"best_test_acc": value, "final_test_acc": value - 0.01}
        return {"labels": {"variant": variant, **labels, "seed": seed}, "final": final}

    runs = [
        run("none", 0, 0.90), run("none", 1, 0.92), run("pla-fc1", 0, 0.95),
        run("decay", 0, 0.91, **{"optimizer.weight_decay": 0.01, "loss.y": 4}),
        run("decay", 0, 0.93, **{"optimizer.weight_decay": 0.01, "loss.y": 8}),
    ]  # fmt: skip
    series, baselines = versus_series(runs, "optimizer.weight_decay", lines="variant")
    assert baselines == {"none": [(0.90, 0.89), (0.92, 0.91)], "pla-fc1": [(0.95, 0.94)]}
    assert series == {"decay": {0.01: [(0.91, 0.90), (0.93, 0.92)]}}  # y pooled, not a line
    series, _ = versus_series(runs, "optimizer.weight_decay")  # every other label a line
    assert set(series) == {"decay y=4", "decay y=8"}
