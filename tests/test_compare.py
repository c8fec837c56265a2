"""Comparisons: variants merged into a base, run, kept when finished, plotted from data."""

from __future__ import annotations

import json

import pytest
import yaml

from sgdgeom.errors import ConfigError
from sgdgeom.experiments.compare import load_comparison, merge, run_comparison

COMPARISON = {
    "name": "tiny",
    "base": {
        "seed": 1,
        "data": {"name": "digits", "batch_size": 32, "n_train": 256, "n_test": 128},
        "model": {"name": "mlp", "widths": [16]},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 2, "device": "cpu"},
    },
    "variants": {
        "sgd": {},
        "weak": {"optimizer": {"name": "diffusion-metric-sgd", "inverse": "weak"}},
        "exact": {"optimizer": {"name": "diffusion-metric-sgd", "inverse": "exact", "eps": "auto"}},
    },
}


def write(tmp_path, data):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge(base, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_run_comparison_and_skip_finished(tmp_path):
    path = write(tmp_path, COMPARISON)
    summary = run_comparison(path, tmp_path / "out", progress=False)
    assert set(summary["variants"]) == {"sgd", "weak", "exact"}
    for final in summary["variants"].values():
        assert final["epochs"] == 2 and final["final_test_acc"] > 0.5
    assert (tmp_path / "out/curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert saved == summary
    stamp = (tmp_path / "out/sgd/final.json").stat().st_mtime_ns
    assert run_comparison(path, tmp_path / "out", progress=False) == summary
    assert (tmp_path / "out/sgd/final.json").stat().st_mtime_ns == stamp  # not rerun


def test_bad_comparisons(tmp_path):
    with pytest.raises(ConfigError, match="exactly the keys name, base, variants"):
        load_comparison(write(tmp_path, {**COMPARISON, "extra": 1}))
    bad = {**COMPARISON, "variants": {"x": {"optimizer": {"lrr": 1}}}}
    with pytest.raises(ConfigError, match=r"variant 'x'.*optimizer\.lrr: unknown key"):
        load_comparison(write(tmp_path, bad))
