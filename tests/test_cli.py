"""The command line: bad input is one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sgdgeom.experiments.store import ResultStore
from sgdgeom.experiments.sweep import SweepConfig, expand_sweep
from tests.test_data import write_idx

ROOT = Path(__file__).parents[1]


def sgdgeom(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sgdgeom", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("sgdgeom: error: ")
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


def quick_config(tmp_path, **changes):
    config = yaml.safe_load((ROOT / "configs/quick/mnist5k-fc2-sgd.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_config_key(tmp_path):
    proc = sgdgeom("train", quick_config(tmp_path, optimizer__lrr=0.1), "--out", tmp_path / "r")
    assert_one_line_error(proc, r"optimizer\.lrr: unknown key; allowed: name, lr")


def test_missing_data_root(tmp_path):
    path = quick_config(tmp_path, data__name="mnist")
    proc = sgdgeom("train", path, "--out", tmp_path / "r", "--data-root", tmp_path / "absent")
    assert_one_line_error(proc, r"data root .*absent does not exist")


def test_truncated_idx_file(tmp_path):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for split, n in (("train", 8), ("t10k", 4)):
        write_idx(folder / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    broken = folder / "train-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:-100])
    path = quick_config(tmp_path, data__name="mnist")
    proc = sgdgeom("train", path, "--out", tmp_path / "r", "--data-root", tmp_path / "data")
    assert_one_line_error(proc, r"truncated or corrupt file .*train-images-idx3-ubyte")


def test_datasets_and_help():
    proc = sgdgeom("datasets")
    assert proc.returncode == 0
    assert "mnist5k" in proc.stdout and "offline" in proc.stdout
    help_text = sgdgeom("train", "--help").stdout
    assert "--resume" in help_text and "--data-root" in help_text


def test_sweep_command_runs_reports_and_refuses_bad_sweeps(tmp_path):
    sweep = {
        "name": "cli",
        "base": {
            "data": {"name": "digits", "batch_size": 64, "n_train": 128, "n_test": 64},
            "model": {"name": "mlp", "widths": [8]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 1, "device": "cpu"},
        },
        "grid": {"optimizer.lr": [0.1, 0.2]},
        "plots": [{"kind": "versus", "x": "optimizer.lr"}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = sgdgeom("sweep", path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "report.html").is_file()
    assert "report:" in proc.stdout
    again = sgdgeom("sweep", path, "--out", tmp_path / "out")
    assert "2 of 2 runs already finished" in again.stderr + again.stdout
    longer = sgdgeom("sweep", path, "--set", "train.epochs=2", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    store = ResultStore(tmp_path / "runs" / "cli-train.epochs=2" / "results.sqlite")
    assert [run["config"]["train"]["epochs"] for run in store.runs()] == [2, 2]
    assert_one_line_error(sgdgeom("sweep", path, "--set", "optimizer.lr=1"), "a grid sweeps")
    into_the_first = sgdgeom("sweep", path, "--set", "train.epochs=2", "--out", tmp_path / "out")
    assert_one_line_error(into_the_first, "already holds a run of another config")
    assert_one_line_error(sgdgeom("sweep", path, "--set", "epochs"), "expected KEY=VALUE")

    # --only runs part of a sweep into its store; the store's other (pending) runs are not
    # this call's failures, and a pattern that matches nothing is refused
    wider = {**sweep, "grid": {"optimizer.lr": [0.1, 0.2, 0.3, 0.4]}}
    path.write_text(yaml.safe_dump(wider))
    spec = expand_sweep(SweepConfig.model_validate(wider), tmp_path / "out")
    store = ResultStore(tmp_path / "out" / "results.sqlite")
    store.register("cli", [run.as_row() for run in spec.runs])
    part = sgdgeom("sweep", path, "--out", tmp_path / "out", "--only", "*lr=0.3")
    assert part.returncode == 0, part.stderr
    assert "sweep cli: 1 runs into" in part.stdout
    status = {run["name"]: run["status"] for run in store.runs()}
    assert sorted(status.values()) == ["finished", "finished", "finished", "pending"]
    assert status[next(name for name in status if name.endswith("lr=0.4"))] == "pending"
    assert_one_line_error(sgdgeom("sweep", path, "--only", "*lr=0.5"), "matches no run")
    path.write_text(yaml.safe_dump(sweep))

    assert_one_line_error(sgdgeom("sweep", path, "--engine", "dask"), "unknown engine")
    sweep["plots"] = [{"kind": "versus", "x": "loss.R"}]
    path.write_text(yaml.safe_dump(sweep))
    assert_one_line_error(sgdgeom("sweep", path), "no run has that label")
    assert_one_line_error(sgdgeom("report", tmp_path / "nowhere"), "no result store")


def test_table1_counts_parameters_and_rank_bounds():
    proc = sgdgeom("table1")
    assert proc.returncode == 0, proc.stderr
    assert "1,238,730" in proc.stdout  # 784-784-784-10: 2·(784·784 + 784) + 784·10 + 10
    assert "59,999" in proc.stdout and "Wide ResNet" in proc.stdout
    assert "11,173,962" in proc.stdout  # ResNet-18 (CIFAR layout), counted
    assert "CIFAR 50,000" in proc.stdout  # the training set, not the quoted 60,000
    one = sgdgeom("table1", "--model", "fc", "--dataset", "mnist5k", "--model-option", "depth=3")
    assert "1,854,170" in one.stdout and "3,999" in one.stdout
    assert_one_line_error(sgdgeom("table1", "--model", "fc"), "both --model and --dataset")
    assert_one_line_error(
        sgdgeom("table1", "--model", "resnet", "--dataset", "mnist"), "unknown model"
    )


@pytest.mark.slow
def test_demo_writes_a_report_with_every_part(tmp_path):
    out = tmp_path / "demo"
    proc = sgdgeom(
        "demo", "--out", out, "--n-train", "256", "--epochs", "1", "--spectrum-n", "64",
        "--sgd-runs", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.html'}" in proc.stdout
    text = (out / "report.html").read_text()
    for title in ("Sweep demo", "Diffusion matrix", "Layer temperatures", "Geodesics"):
        assert title in text
    assert text.count("data:image/png;base64,") == 4
    for variant in ("sgd", "pla-fc2", "diffusion-sgd"):
        assert (out / "runs" / variant / "final.json").is_file()
