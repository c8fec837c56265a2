"""`sgdgeom spectrum`: the report's numbers, its plot, and checkpoints from `sgdgeom train`."""

from __future__ import annotations

import json

import pytest

from sgdgeom.errors import ConfigError, SgdgeomError
from sgdgeom.experiments.config import parse_config
from sgdgeom.experiments.runner import run_training
from sgdgeom.experiments.spectrum import format_report, spectrum_report, write_report
from tests.test_cli import assert_one_line_error, sgdgeom


def test_report_numbers_and_files(tmp_path):
    report = spectrum_report("mlp", "digits", n=40, model_options={"widths": [8]}, progress=False)
    assert report["d"] == 64 * 8 + 8 + 8 * 10 + 10
    assert report["N"] == 40 and report["rank_bound"] == 39
    assert report["rank"] == 39  # d >= N and generic data: the bound (F3) is attained
    assert report["lambda_max"] == pytest.approx(report["eigenvalues"][0])
    assert sum(report["eigenvalues"]) == pytest.approx(report["trace"], rel=1e-9)
    assert sum(layer["trace"] for layer in report["layers"].values()) == pytest.approx(
        report["trace"], rel=1e-9
    )
    assert "fc1" in format_report(report) and "footnote 7" in format_report(report)
    assert set(report["within_layer"]) == set(report["layers"]) == {"fc1", "out"}
    json_path, png = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["rank"] == 39
    assert png.stat().st_size > 10_000


def test_checkpoint_supplies_model_and_dataset(tmp_path):
    config = parse_config(
        {
            "name": "spec",
            "data": {"name": "digits", "batch_size": 32, "n_train": 128},
            "model": {"name": "mlp", "widths": [6]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 1, "device": "cpu"},
        }
    )
    run_training(config, tmp_path / "run", progress=False)
    report = spectrum_report(
        None, None, n=30, checkpoint=tmp_path / "run/checkpoint.pt", progress=False
    )
    assert report["model"] == "mlp" and report["model_options"] == {"widths": [6]}
    fresh = spectrum_report("mlp", "digits", n=30, model_options={"widths": [6]}, progress=False)
    assert report["trace"] != fresh["trace"]  # the trained weights were loaded
    with pytest.raises(SgdgeomError, match="does not fit model"):
        spectrum_report(
            None,
            None,
            n=30,
            checkpoint=tmp_path / "run/checkpoint.pt",
            model_options={"widths": [7]},
            progress=False,
        )


def test_a_checkpoint_trained_on_raw_inputs_is_measured_on_raw_inputs(tmp_path):
    """``data.normalize: false``: the measured D is that of the inputs the run trained on,
    which a standardised batch would silently change."""
    from sgdgeom import DiffusionMatrix
    from sgdgeom.data import load_dataset
    from sgdgeom.experiments.measured import load_measured

    config = parse_config(
        {
            "name": "raw",
            "data": {"name": "digits", "batch_size": 32, "n_train": 64, "normalize": False},
            "model": {"name": "mlp", "widths": [5]},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 1, "device": "cpu"},
        }
    )
    run_training(config, tmp_path / "run", progress=False)
    measured = load_measured(None, None, n=20, checkpoint=tmp_path / "run/checkpoint.pt")
    raw = load_dataset("digits").x_train[:20].double()
    assert measured.x.equal(raw)
    report = spectrum_report(None, None, n=20, checkpoint=tmp_path / "run/checkpoint.pt",
                             progress=False)  # fmt: skip
    D = DiffusionMatrix(measured.model, "cross_entropy", (raw, measured.y))
    assert report["trace"] == pytest.approx(D.trace(), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="name a model and a dataset"):
        spectrum_report("mlp", None, progress=False)
    with pytest.raises(ConfigError, match="--n must be in"):
        spectrum_report("mlp", "digits", n=1, progress=False)
    with pytest.raises(SgdgeomError, match="does not exist"):
        spectrum_report(None, None, checkpoint="absent.pt", progress=False)
    with pytest.raises(ConfigError, match="give --k too"):
        spectrum_report("mlp", "digits", hessian=True, progress=False)
    with pytest.raises(ConfigError, match="--method must be one of"):
        spectrum_report("mlp", "digits", k=3, method="power", progress=False)
    with pytest.raises(ConfigError, match="--k must be in"):
        spectrum_report("mlp", "digits", n=10, k=10, progress=False)


def test_top_k_report_with_the_hessian_equals_the_full_spectrum_and_dense_alignment(tmp_path):
    lines = []
    options = {"widths": [6]}
    full = spectrum_report("mlp", "digits", n=80, model_options=options, progress=False)
    top = spectrum_report(
        "mlp", "digits", n=80, k=4, hessian=True, model_options=options, progress=False,
        log=lines.append,
    )  # fmt: skip
    assert top["eigenvalues"] == pytest.approx(full["eigenvalues"][:4], rel=1e-8)
    assert top["converged"] and max(top["residuals"]) < 1e-7 * top["lambda_max"]
    assert top["passes"] >= 2 and top["products"] >= top["passes"]
    assert "rank" not in top and top["alignment"]["probes"] == 32
    assert 0 < top["alignment"]["overlap"] <= 1
    assert any("top-4 by lanczos" in line for line in lines)
    assert any("Hessian top-4 by lanczos" in line for line in lines)
    assert any("captured in" in line for line in lines)
    write_report(top, tmp_path)
    assert "top-k overlap" in format_report(top) and (tmp_path / "spectrum.png").is_file()


def test_cli_spectrum(tmp_path):
    proc = sgdgeom(
        "spectrum",
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--n",
        "30",
        "--model-option",
        "widths=[5]",
        "--out",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rank bound N-1   29" in proc.stdout
    assert (tmp_path / "spectrum.png").is_file()
    assert_one_line_error(
        sgdgeom(
            "spectrum",
            "--model",
            "mlp",
            "--dataset",
            "digits",
            "--model-option",
            "widths",
            "--out",
            tmp_path,
        ),
        "not KEY=VALUE",
    )
