"""scripts/replication_tables.py: the report's tables from a result store."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sgdgeom.experiments.store import ResultStore

SCRIPT = Path(__file__).parents[1] / "scripts" / "replication_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("replication_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(
    path: Path, more: dict[tuple[str, float], tuple[float | str | None, ...]] | None = None
) -> None:
    """Two optimizers over two learning rates and two seeds, with known accuracies; ``more``
    adds groups by (variant, lr), None for a seed whose run failed, "pending" or "running"
    for one not finished."""
    store = ResultStore(path / "results.sqlite")
    accuracy = {("a", 0.1): (0.90, 0.94), ("a", 0.3): (0.80, 0.82), ("b", 0.1): (0.70, 0.70),
                ("b", 0.3): (0.75, 0.77)}  # fmt: skip
    accuracy.update(more or {})
    runs = []
    for (variant, lr), values in accuracy.items():
        for seed, value in enumerate(values):
            labels = {"variant": variant, "optimizer.lr": lr, "seed": seed}
            name = f"{variant}_lr={lr}_seed={seed}"
            runs.append({"hash": name, "name": name, "labels": labels, "config": {},
                         "run_dir": path / name, "value": value})  # fmt: skip
    store.register("sweep", runs)
    for run in runs:
        if run["value"] == "running":
            store.start(run["hash"], 0)
        if run["value"] in ("pending", "running"):
            continue
        store.start(run["hash"], 0)
        if run["value"] is None:
            store.fail(run["hash"], "non-finite loss")
            continue
        store.record_epoch(run["hash"], {"epoch": 1, "seconds": 2.0})
        final = {"best_test_acc": run["value"], "final_test_acc": run["value"] - 0.01,
                 "final_test_loss": 1 - run["value"]}  # fmt: skip
        store.finish(run["hash"], final)


def test_rows_are_means_with_standard_errors(tables, tmp_path):
    _store(tmp_path)
    table = tables.summarise(tmp_path)
    row = table["a lr=0.1"]
    assert row["runs"] == 2 and row["seconds_per_epoch"] == 2.0
    assert row["best_test_acc"] == pytest.approx([0.92, 0.02])  # s.e. of (0.90, 0.94)
    assert row["final_test_loss"] == pytest.approx([0.08, 0.02])


def test_each_variant_at_its_best_learning_rate_with_grid_edges_marked(tables, tmp_path):
    _store(tmp_path)
    lines = tables.best_learning_rates(tables.summarise(tmp_path)).splitlines()
    assert lines[2].startswith("| a | 0.1, 0.3 | 0.1 ↓ | 2 | 0.9200 ± 0.0200")
    assert lines[3].startswith("| b | 0.1, 0.3 | 0.3 ↑ | 2 | 0.7600 ± 0.0100")
    assert tables.best_learning_rates({}) == ""


def test_the_rbm_script_runs_resumes_and_summarises(tmp_path):
    """scripts/rbm_replication.py on a tiny config: two seeds, one lr; a second call reuses
    the finished runs; the summary pairs the metric's differences from CD by seed."""
    import json
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load((SCRIPT.parents[1] / "configs/quick/rbm/digits.yaml").read_text())
    config.update(epochs=2, n_train=60, n_hidden=4, spectrum_every=2, probe_size=16)
    (tmp_path / "rbm.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, str(SCRIPT.parent / "rbm_replication.py"), "rbm.yaml",
               "--seeds", "0", "1", "--lrs", "0.05", "--out", "out"]  # fmt: skip
    for _ in range(2):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out/summary.json").read_text())["lrs"]["0.05"]
    assert summary["runs"] == 2 and (tmp_path / "out/rbm-replication.png").exists()
    cd = [json.loads((tmp_path / f"out/lr=0.05_seed={s}/summary.json").read_text()) for s in (0, 1)]
    finals = [run["updates"]["cd"]["test_loglik"] for run in cd]
    assert summary["cd"]["final_test_loglik"][0] == pytest.approx(sum(finals) / 2)
    assert set(summary["metric-weak"]) == {
        "best_test_loglik",
        "final_test_loglik",
        "final_minus_cd",
        "last10_test_loglik",
        "last10_test_loglik_per_run",
        "last10_minus_cd",
        "last10_train_loglik",
    }
    picked = json.loads((tmp_path / "out/summary.json").read_text())["picked"]
    assert picked["cd"]["lr"] == "0.05"
    # one lr, so the pick's difference is the paired one of that lr, not the unpaired one
    paired = summary["metric-exact"]["last10_minus_cd"]
    assert picked["metric-exact"]["minus_cd_at_its_pick"] == pytest.approx(paired, abs=1e-12)


def test_the_rbm_pick_pairs_seeds_across_learning_rates():
    """Each rule at its own lr: the difference from CD pairs seed with seed (its s.e. is
    that of the per-seed differences, not the two s.e.'s combined)."""
    spec = importlib.util.spec_from_file_location("rbm", SCRIPT.parent / "rbm_replication.py")
    rbm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rbm)

    def run(cd: float, metric: float) -> dict[str, np.ndarray]:
        return {"cd": np.full(12, cd), "metric": np.full(12, metric)}

    seeds = [0.0, 1.0, 3.0]  # a seed offset shared by every rule and lr
    by_lr = {
        "0.1": rbm.summarise([run(-10 + s, -11 + s) for s in seeds], ["cd", "metric"],
                             [{"cd": np.full(12, 5.0), "metric": np.full(12, 1.0)}] * 3),
        "0.2": rbm.summarise([run(-12 + s, -9.5 + 2 * s) for s in seeds], ["cd", "metric"],
                             [{"cd": np.full(12, 1.0), "metric": np.full(12, 5.0)}] * 3),
    }  # fmt: skip
    picked = rbm.picks(by_lr, ["cd", "metric"])
    assert (picked["cd"]["lr"], picked["metric"]["lr"]) == ("0.1", "0.2")
    differences = np.array([(-9.5 + 2 * s) - (-10 + s) for s in seeds])
    assert picked["metric"]["minus_cd_at_its_pick"] == pytest.approx(
        [differences.mean(), differences.std(ddof=1) / np.sqrt(3)], abs=1e-12
    )


def test_failed_runs_are_counted_and_a_failed_grid_point_is_never_best(tables, tmp_path):
    more = {("c", 0.1): (0.60, None), ("c", 0.3): (None, None), ("c", 1.0): ("pending", "running")}
    _store(tmp_path, more)
    table = tables.summarise(tmp_path)
    assert table["c lr=0.1"]["runs"] == 1 and table["c lr=0.1"]["failed"] == 1
    assert table["c lr=0.3"]["best_test_acc"] is None
    assert table["c lr=0.3"]["seconds_per_epoch"] is None
    assert "| c lr=0.3 | 0 (2 failed) | — |" in tables.markdown("t", table)
    lines = tables.best_learning_rates(table).splitlines()
    assert lines[-1].startswith("| c | 0.1, 0.3†, 1* | 0.1 ↓ | 1 (1 failed) | 0.6000 ± 0.0000")
    tables.plot_learning_rates(table, tmp_path / "bars.png", "t")
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_every_group_is_paired_by_seed_with_the_baseline(tables, tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    accuracy = {
        ("none", 0): 0.90,
        ("none", 1): 0.80,
        ("pla", 0): 0.93,
        ("pla", 1): 0.82,
        ("pla", 2): 0.99,
    }  # fmt: skip  (seed 2 has no baseline run to pair with)
    runs = [{"hash": f"{v}{s}", "name": f"{v}_seed={s}", "labels": {"variant": v, "seed": s},
             "config": {}, "run_dir": tmp_path / f"{v}{s}"} for v, s in accuracy]  # fmt: skip
    store.register("sweep", runs)
    for (variant, seed), value in accuracy.items():
        store.start(f"{variant}{seed}", 0)
        final = {"best_test_acc": value, "final_test_acc": value, "final_test_loss": 1 - value}
        store.finish(f"{variant}{seed}", final)
    table = tables.summarise(tmp_path)
    assert "paired" not in table["none"]
    assert table["pla"]["pairs"] == 2
    assert table["pla"]["paired"]["best_test_acc"] == pytest.approx([0.025, 0.005])
    assert table["pla"]["paired"]["final_test_loss"] == pytest.approx([-0.025, 0.005])
    assert "| +0.0250 ± 0.0050 |" in tables.markdown("t", table)


def _validated_store(path: Path, results: dict, lr: bool) -> None:
    """Runs that picked their epoch on a validation part, ``{(variant, lr): ((val acc of
    seeds 0, 1), (test acc of seeds 0, 1))}``, on n = 1,000 test images."""
    store = ResultStore(path / "results.sqlite")
    runs = []
    for (variant, rate), (val, test) in results.items():
        for seed in (0, 1):
            labels = {"variant": variant, "seed": seed} | ({"optimizer.lr": rate} if lr else {})
            name = f"{variant}_lr={rate}_seed={seed}"
            final = {"best_val_acc": val[seed], "best_test_acc": test[seed],
                     "final_test_acc": test[seed], "final_test_loss": 0.5,
                     "selected_by": "val_acc", "test_samples": 1000}  # fmt: skip
            runs.append({"hash": name, "name": name, "config": {}, "run_dir": path / name,
                         "labels": labels, "final": final})  # fmt: skip
    store.register("sweep", runs)
    for run in runs:
        store.start(run["hash"], 0)
        store.finish(run["hash"], run["final"])


def _binomial(p: float, n: int = 1000) -> float:
    return (p * (1 - p) / n) ** 0.5


def test_the_learning_rate_is_picked_on_validation_and_accuracies_carry_binomial_errors(
    tables, tmp_path
):
    """Validation prefers lr 0.1 (0.85 against 0.83) where the test set would prefer 0.3
    (0.84 against 0.80): the table takes 0.1, and reports its test accuracy with the seeds'
    s.e. and sqrt(p (1 − p) / n)."""
    results = {("pla", 0.1): ((0.86, 0.84), (0.81, 0.79)),
               ("pla", 0.3): ((0.84, 0.82), (0.85, 0.83))}  # fmt: skip
    _validated_store(tmp_path, results, lr=True)
    table = tables.summarise(tmp_path)
    row = table["pla lr=0.1"]
    assert row["selected_by"] == "val_acc" and row["best_val_acc"] == pytest.approx([0.85, 0.01])
    assert row["test_samples"] == 1000
    assert row["binomial"]["best_test_acc"] == pytest.approx(_binomial(0.80))
    lines = tables.best_learning_rates(table).splitlines()
    assert "on the validation part" in lines[0]
    expected = f"| pla | 0.1, 0.3 | 0.1 ↓ | 2 | 0.8000 ± 0.0100 ± {_binomial(0.8):.4f}"
    assert lines[2].startswith(expected)


def test_a_paired_difference_carries_its_binomial_bound(tables, tmp_path):
    results = {("none", 0): ((0.80, 0.80), (0.80, 0.78)),
               ("pla", 0): ((0.82, 0.82), (0.83, 0.81))}  # fmt: skip
    _validated_store(tmp_path, results, lr=False)
    table = tables.summarise(tmp_path)
    pla = table["pla"]
    assert pla["paired"]["best_test_acc"] == pytest.approx([0.03, 0.0])
    bound = (_binomial(0.82) ** 2 + _binomial(0.79) ** 2) ** 0.5
    assert pla["paired_binomial"]["best_test_acc"] == pytest.approx(bound)
    text = tables.markdown("t", table)
    assert "picked on the validation part" in text
    assert f"| +0.0300 ± 0.0000 (± {bound:.4f}) |" in text
    assert f"0.7900 ± 0.0100 ± {_binomial(0.79):.4f}" in text


def test_a_difference_with_kept_test_correct_carries_the_paired_error(tables, tmp_path):
    """Two models that disagree on 30 of 1,000 test images (20 won, 10 lost): the paired
    s.e. of the difference is sd(δ)/sqrt(n), far below the independent bound, and a
    test_correct.npy that disagrees with its run's accuracy is left out."""
    results = {("none", 0): ((0.80, 0.80), (0.80, 0.80)),
               ("pla", 0): ((0.82, 0.82), (0.81, 0.81))}  # fmt: skip
    _validated_store(tmp_path, results, lr=False)
    rng = np.random.default_rng(0)
    base = np.zeros(1000, dtype=bool)
    base[rng.permutation(1000)[:800]] = True
    right, wrong = np.flatnonzero(base), np.flatnonzero(~base)
    pla = base.copy()
    pla[wrong[:20]], pla[right[:10]] = True, False  # accuracy 0.81
    delta = pla.astype(float) - base.astype(float)
    expected = delta.std(ddof=1) / 1000**0.5  # = sqrt(30 − 10²/1000)/1000 ≈ 0.0055
    for seed in (0, 1):
        for name, correct in (("none", base), ("pla", pla)):
            folder = tmp_path / "runs" / f"{name}_lr=0_seed={seed}"
            folder.mkdir(parents=True)
            np.save(folder / "test_correct.npy", correct)
    row = tables.summarise(tmp_path)["pla"]
    assert row["paired_test_se"] == pytest.approx(expected)
    assert row["paired_test_se"] < row["paired_binomial"]["best_test_acc"] / 3
    text = tables.markdown("t", tables.summarise(tmp_path))
    assert f"| +0.0100 ± 0.0000 (± {expected:.4f} paired) |" in text
    found = tables.contrasts(tmp_path, [("none", "pla"), ("none", "absent")])
    assert list(found) == ["none − pla"]  # a contrast with a group the sweep lacks: left out
    assert found["none − pla"]["paired"]["best_test_acc"] == pytest.approx([-0.01, 0.0])
    assert found["none − pla"]["paired_test_se"] == pytest.approx(expected)
    assert f"| none − pla | 2 | -0.0100 ± 0.0000 | ± {expected:.4f} paired |" in (
        tables.contrast_markdown(found)
    )
    np.save(tmp_path / "runs" / "pla_lr=0_seed=1" / "test_correct.npy", base)  # 0.80 ≠ 0.81
    row = tables.summarise(tmp_path)["pla"]
    assert row["paired_test_se"] is None
    (tmp_path / "runs" / "pla_lr=0_seed=1" / "test_correct.npy").write_bytes(b"\x93NUMPY")
    row = tables.summarise(tmp_path)["pla"]  # a truncated file: left out, not a crash
    assert row["paired_test_se"] is None
    assert row["paired"]["best_test_acc"][0] == pytest.approx(0.01)


def test_paired_differences_against_a_label_by_line(tables, tmp_path):
    """Two layers' smoothing over R, paired by seed with the baseline: each point is the
    mean difference, its seeds' s.e., that s.e. with the test set's bound added in
    quadrature, and its number of pairs; one pair has no seed error."""
    store = ResultStore(tmp_path / "results.sqlite")
    accuracy = {("none", None, None, 0): 0.80, ("none", None, None, 1): 0.78,
                ("pla", 0.01, "fc2", 0): 0.83, ("pla", 0.01, "fc2", 1): 0.79,
                ("pla", 0.1, "fc2", 0): 0.75, ("pla", 0.01, "fc1", 1): 0.77}  # fmt: skip
    runs = []
    for variant, R, layers, seed in accuracy:
        labels = {"variant": variant, "seed": seed}
        if R is not None:
            labels |= {"loss.R": R, "loss.layers": layers}
        name = f"{variant}_{R}_{layers}_{seed}"
        runs.append({"hash": name, "name": name, "labels": labels, "config": {},
                     "run_dir": tmp_path / name})  # fmt: skip
    store.register("sweep", runs)
    for run, value in zip(runs, accuracy.values(), strict=True):
        store.start(run["hash"], 0)
        store.finish(run["hash"], {"best_test_acc": value, "final_test_acc": value,
                                   "final_test_loss": 0.5, "test_samples": 1000})  # fmt: skip
    table = tables.summarise(tmp_path)
    series = tables.paired_versus_series(table, "loss.R")
    assert list(series) == ["pla layers=fc1", "pla layers=fc2"]
    (x, mean, seed_se, total, pairs), (x2, mean2, seed_se2, total2, pairs2) = series[
        "pla layers=fc2"
    ]
    assert (x, x2, pairs, pairs2) == (0.01, 0.1, 2, 1)
    assert (mean, seed_se) == pytest.approx((0.02, 0.01))  # differences +0.03 and +0.01
    bound = (_binomial(0.81) ** 2 + _binomial(0.79) ** 2) ** 0.5
    assert total == pytest.approx((0.01**2 + bound**2) ** 0.5)
    assert (mean2, seed_se2) == pytest.approx((-0.05, 0.0))
    assert total2 == pytest.approx((_binomial(0.75) ** 2 + _binomial(0.80) ** 2) ** 0.5)
    fc1_bound = (_binomial(0.77) ** 2 + _binomial(0.78) ** 2) ** 0.5  # seed 1 only
    assert series["pla layers=fc1"] == [pytest.approx((0.01, -0.01, 0.0, fc1_bound, 1))]
    tables.plot_paired_versus(table, "loss.R", tmp_path / "paired.png", "sweep")
    assert (tmp_path / "paired.png").stat().st_size > 0
    table["pla R=0.1 layers=fc2"]["labels"]["loss.R"] = 0.0  # no log axis for a 0
    tables.plot_paired_versus(table, "loss.R", tmp_path / "linear.png", "sweep")
    assert (tmp_path / "linear.png").stat().st_size > 0


def test_versus_without_a_figures_folder_is_refused(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--versus", "loss.R"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "--versus draws a figure" in proc.stderr


ARCHIVED = {
    "replication-musso-5.json.xz": "musso-5-mnist5k-cnn-rerun",
    "replication-musso-5.1.json.xz": "musso-5.1-mnist5k-cnn-conv",
}
"""Each committed run archive and the key of docs/benchmarks/replication.json made from it."""


@pytest.mark.parametrize("archive", sorted(ARCHIVED))
def test_the_report_numbers_come_back_from_the_committed_run_archives(tables, tmp_path, archive):
    """Restoring a committed archive and summarising it gives the committed table, digit
    for digit: the report's numbers can be rebuilt on a new machine."""
    import json

    from sgdgeom.experiments.merge import merge_store

    root = Path(__file__).parents[1] / "docs" / "benchmarks"
    merge_store(root / "archives" / archive, tmp_path / "store")
    committed = json.loads((root / "replication.json").read_text())[ARCHIVED[archive]]
    assert json.loads(json.dumps(tables.summarise(tmp_path / "store"))) == committed


def test_the_fashion_archive_gives_the_summary_s_rerun_groups(tables, tmp_path):
    """The Fashion-MNIST archive, restored: its y = 8 and PLEA groups, their contrasts
    with PLA at y = 4, and PLA's three contrasts among the subsets at each R ≤ 0.005 are
    the ones docs/benchmarks/musso-4.2-fashion-summary.json holds."""
    import json

    from sgdgeom.experiments.merge import merge_store

    root = Path(__file__).parents[1] / "docs" / "benchmarks"
    merge_store(root / "archives" / "musso-4.2-fashion-fc2.json.xz", tmp_path / "store")
    summary = json.loads((root / "musso-4.2-fashion-summary.json").read_text())
    table = json.loads(json.dumps(tables.summarise(tmp_path / "store")))
    small_r = ("0.001", "0.002", "0.005")
    y8_rs = {
        "fc2": (*small_r, "0.01", "0.02", "0.05", "0.1"),
        "fc1": (*small_r, "0.05"),
        "fc1+fc2": ("0.001", "0.002", "0.05"),
    }
    y8_cells = [(r, layers) for layers, rs in y8_rs.items() for r in rs]
    plea_cells = [(r, layers) for r in small_r for layers in ("fc2", "fc1", "fc1+fc2")]
    plea_cells += [("0.05", "fc2"), ("0.05", "fc1"), ("0.05", "fc1+fc2")]
    cells = [("pla_y8", *cell) for cell in y8_cells] + [("plea", *cell) for cell in plea_cells]
    pairs = [
        (f"{variant} R={r} layers={layers}", f"pla R={r} layers={layers}")
        for variant, r, layers in cells
    ]
    pairs += [(f"pla R={r} layers=fc2", f"pla R={r} layers=fc1") for r in small_r]
    pairs += [
        (f"pla R={r} layers={one}", f"pla R={r} layers=fc1+fc2")
        for r in small_r
        for one in ("fc2", "fc1")
    ]
    found = json.loads(json.dumps(tables.contrasts(tmp_path / "store", pairs)))
    for rerun, partner in pairs:
        assert table[rerun] == summary["groups"][rerun]
        assert found[f"{rerun} − {partner}"] == summary["contrasts"][f"{rerun} − {partner}"]
