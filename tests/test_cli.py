"""The command line: bad input is one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

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
