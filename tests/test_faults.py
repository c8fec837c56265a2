"""Fault injection: hostile files, configs and processes against the ``sgdgeom`` command.

Each case builds the hostile input, runs the CLI in a subprocess and asserts the one-line
message, the exit status, and that nothing outside the output folder changed. The cases
follow the issue "Trust the files" point by point (its numbers in the section titles).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sgdgeom.callbacks import Callback
from sgdgeom.data import load_dataset
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    NonFiniteLossError,
    SgdgeomError,
)
from sgdgeom.experiments import sweep as sweep_module
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.experiments.sweep import SweepConfig, expand_sweep, run_sweep
from sgdgeom.files import atomic_write_bytes, read_jsonl, safe_name
from sgdgeom.models import build_model
from sgdgeom.train import Trainer
from tests.test_cli import assert_one_line_error, sgdgeom
from tests.test_data import make_mnist_root, write_idx

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 32, "n_train": 128, "n_test": 64},
    "model": {"name": "mlp", "widths": [16]},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "train": {"epochs": 1, "device": "cpu"},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def config(tmp_path: Path, name: str = "config.yaml", **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for section, value in sections.items():
        same = isinstance(value, dict) and isinstance(data.get(section), dict)
        if same and value.get("name", data[section].get("name")) == data[section].get("name"):
            data[section].update(value)  # the same component with other options
        else:
            data[section] = value
    return write_yaml(tmp_path / name, data)


def snapshot(root: Path, *outputs: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` outside ``outputs``, with its size and modification time."""
    seen = {}
    for path in root.rglob("*"):
        if any(path == out or out in path.parents for out in outputs):
            continue
        stat = path.lstat()
        seen[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return seen


def run_cli(tmp_path: Path, *args, outputs: tuple[Path, ...] = ()):
    """Run the CLI in ``tmp_path`` and assert that it changed nothing outside ``outputs``."""
    before = snapshot(tmp_path, *outputs)
    proc = sgdgeom(*args, cwd=tmp_path)
    assert snapshot(tmp_path, *outputs) == before, proc.stderr
    return proc


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trained_run(tmp_path: Path, name: str = "run", **sections) -> tuple[Path, Path]:
    path = config(tmp_path, f"{name}.yaml", **sections)
    out = tmp_path / name
    proc = sgdgeom("train", path, "--out", out, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return path, out


# ------------------------------------------------------------- 1. code in checkpoints


def test_malicious_checkpoint_never_runs_its_payload(tmp_path):
    path, out = trained_run(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"model": Payload(marker), "epoch": 1}, out / "checkpoint.pt")
    proc = run_cli(tmp_path, "train", path, "--out", out, "--resume", outputs=(out,))
    assert_one_line_error(proc, r"checkpoint .*\(the global posix.system\), .* not loaded")
    proc = run_cli(
        tmp_path, "spectrum", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "s"
    )
    assert_one_line_error(proc, r"weights_only=True")
    assert not marker.exists()


def test_malicious_cifar_batch_never_runs_its_payload(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    proc = run_cli(tmp_path, "datasets", "--data-root", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert "cifar10        corrupt" in proc.stdout
    assert "global posix.system is not allowed" in proc.stdout
    proc = run_cli(
        tmp_path, "spectrum", "--model", "mlp", "--dataset", "cifar10",
        "--data-root", tmp_path / "data", "--out", tmp_path / "s",
    )  # fmt: skip
    assert_one_line_error(proc, r"corrupt file .*data_batch_1")
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "notes.pt").write_text("data: [1, 2]\n")
    proc = run_cli(tmp_path, "spectrum", "--checkpoint", "notes.pt", "--out", tmp_path / "s")
    assert_one_line_error(proc, r"notes.pt is not a checkpoint, or is corrupt")


def test_truncated_checkpoint_says_so(tmp_path):
    path, out = trained_run(tmp_path)
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    proc = run_cli(tmp_path, "train", path, "--out", out, "--resume", outputs=(out,))
    assert_one_line_error(proc, r"checkpoint .* is truncated or corrupt")


# ------------------------------------------------------------- 2. writes outside --out


def test_sweep_named_with_a_path_writes_only_inside_out(tmp_path):
    for name in ("../../x", "/tmp/sgdgeom-escape-test"):
        shutil.rmtree("/tmp/sgdgeom-escape-test", ignore_errors=True)
        sweep = write_yaml(
            tmp_path / "sweep.yaml",
            {"name": name, "base": {k: v for k, v in TINY.items() if k != "name"}},
        )
        out = tmp_path / "out"
        proc = run_cli(tmp_path, "sweep", sweep, "--out", out, outputs=(out,))
        assert proc.returncode == 0, proc.stderr
        figures = sorted(p.name for p in (out / "figures").iterdir())
        assert figures == [f"{safe_name(name + '-curves')}.{s}" for s in ("png", "svg")]
        assert not Path("/tmp/sgdgeom-escape-test").exists()
        shutil.rmtree(out)


def test_planted_link_at_a_temporary_name_is_never_followed(tmp_path):
    path, out = trained_run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".metrics.jsonl.tmp", ".checkpoint.pt.tmp", ".final.json.tmp"):
        (out / name).symlink_to(victim)
    (out / "final.json").unlink()
    config_data = yaml.safe_load(path.read_text())
    config_data["train"]["epochs"] = 2
    write_yaml(path, config_data)
    shutil.copy(path, out / "config.yaml")  # the same run, trained one epoch longer
    proc = run_cli(tmp_path, "train", path, "--out", out, "--resume", outputs=(out,))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_report_embeds_only_files_of_its_own_folder(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    out = tmp_path / "out"
    ResultStore(out / STORE)
    for image in (str(secret), "../secret.png"):
        (out / "sections.json").write_text(json.dumps([{"title": "t", "images": [image]}]))
        proc = run_cli(tmp_path, "report", out, outputs=(out,))
        assert_one_line_error(proc, r"image .*secret.png lies outside .*out")
        assert not (out / "report.html").exists()
    (out / "sections.json").write_text("{not json")
    proc = run_cli(tmp_path, "report", out, outputs=(out,))
    assert_one_line_error(proc, r"is not a list of report sections")


def test_config_named_with_an_absolute_path_writes_under_runs(tmp_path):
    escape = tmp_path / "elsewhere" / "x"
    path = write_yaml(tmp_path / "config.yaml", {**TINY, "name": str(escape)})
    proc = run_cli(tmp_path, "train", path, "--no-progress", outputs=(tmp_path / "runs",))
    assert proc.returncode == 0, proc.stderr
    assert not escape.parent.exists()
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.endswith("-elsewhere-x") and "/" not in folder.name


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # as open() makes
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "plain"]


# ------------------------------------------------------------- 3. foreign checkpoints


def test_checkpoint_of_another_config_is_refused(tmp_path):
    _, fast = trained_run(tmp_path, "fast", optimizer={"name": "sgd", "lr": 0.9})
    slow_config, slow = trained_run(tmp_path, "slow")
    (slow / "final.json").unlink()
    shutil.copy(fast / "checkpoint.pt", slow / "checkpoint.pt")
    proc = run_cli(tmp_path, "train", slow_config, "--out", slow, "--resume", outputs=(slow,))
    assert_one_line_error(proc, r"belongs to another run \(run id \w+, this run's is \w+\)")


def test_python_trainer_refuses_another_optimizers_checkpoint(tmp_path):
    data = load_dataset("digits").subset(64, 32)

    def trainer(optimizer_class, **hyper):
        torch.manual_seed(0)
        model = build_model("mlp", data.input_shape, 10, widths=[8])
        return Trainer(
            model, data, optimizer_class(model.parameters(), **hyper), epochs=1,
            batch_size=32, out_dir=tmp_path, progress=False,
        )  # fmt: skip

    trainer(torch.optim.Adam, lr=1e-3).fit()
    with pytest.raises(CheckpointError, match=r"trained with Adam\(lr=0.001.* this run uses SGD"):
        trainer(torch.optim.SGD, lr=0.05).fit(resume=True)
    with pytest.raises(CheckpointError, match=r"Adam\(lr=0.001.*Adam\(lr=0.9"):
        trainer(torch.optim.Adam, lr=0.9).fit(resume=True)
    with pytest.raises(InputError, match="already holds a run"):
        trainer(torch.optim.Adam, lr=1e-3).fit()
    assert trainer(torch.optim.Adam, lr=1e-3).fit(resume=True)["epochs"] == 1


def test_checkpoints_without_a_run_id_or_with_a_garbled_record_are_refused(tmp_path):
    from sgdgeom.experiments.config import parse_config
    from sgdgeom.experiments.runner import run_training

    cfg = parse_config(TINY)
    run_training(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / "final.json").unlink()
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for change, message in [
        ({"run_id": None}, "records no run id"),
        ({"optimizer_signature": ["junk"]}, "an unreadable optimizer record"),
        ({"optimizer_signature": {"groups": 5}}, r"trained with \?\(\)"),
    ]:
        torch.save({**state, **change}, path)
        with pytest.raises(CheckpointError, match=message):
            run_training(cfg, tmp_path / "run", resume=True, progress=False)


# ------------------------------------------------------------- 4. one run cannot abort a sweep


def test_any_exception_in_a_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = sweep_module.run_training

    def flaky(config, *args, **kwargs):
        if config.seed == 1:
            raise IndexError("label 12 is out of range")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_training", flaky)
    base = {k: v for k, v in TINY.items() if k != "name"}
    sweep = expand_sweep(
        SweepConfig(name="s", base=base, grid={"seed": [0, 1, 2]}), tmp_path / "out"
    )
    rows = run_sweep(sweep, tmp_path / "out", progress=False)["runs"]
    status = {r["labels"]["seed"]: (r["status"], r["error"]) for r in rows}
    assert status == {
        0: ("finished", None),
        1: ("failed", "IndexError: label 12 is out of range"),
        2: ("finished", None),
    }


def test_long_variant_names_are_shortened_uniquely_and_run(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    long = "v" * 300
    variants = {long: {}, long + "w": {"seed": 1}}
    sweep = write_yaml(
        tmp_path / "sweep.yaml", {"name": "long", "base": base, "variants": variants}
    )
    out = tmp_path / "out"
    proc = run_cli(tmp_path, "sweep", sweep, "--out", out, outputs=(out,))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert len(names) == 2 and all(len(n) <= 96 for n in names) and names[0] != names[1]
    assert {r["status"] for r in ResultStore(out / STORE).runs()} == {"finished"}


def test_variants_that_map_to_one_folder_are_refused(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    variants = {"a b": {}, "a-b": {"seed": 1}}
    sweep = write_yaml(tmp_path / "sweep.yaml", {"name": "s", "base": base, "variants": variants})
    proc = run_cli(tmp_path, "sweep", sweep, "--out", tmp_path / "out")
    assert_one_line_error(proc, r"runs 'a b' and 'a-b' both become the folder runs/a-b")
    assert not (tmp_path / "out").exists()
    comparison = write_yaml(
        tmp_path / "compare.yaml", {"name": "c", "base": base, "variants": variants}
    )
    proc = run_cli(tmp_path, "compare", comparison, "--out", tmp_path / "out")
    assert_one_line_error(proc, r"variants 'a b' and 'a-b' both become the folder 'a-b'")


# ------------------------------------------------------------- 5. orphans and races


def _children(pid: int) -> set[int]:
    """The live descendants of ``pid`` (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_killed_sweep_leaves_no_worker_and_refuses_a_second_sweep(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    base["data"] = {"name": "digits", "batch_size": 8}
    base["train"] = {"epochs": 500, "device": "cpu"}  # minutes: killed long before the end
    sweep = write_yaml(
        tmp_path / "sweep.yaml", {"name": "k", "base": base, "grid": {"seed": [0, 1, 2, 3]}}
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sgdgeom", "sweep", str(sweep), "--out", str(out),
               "--workers", "2", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    running = []
    while time.monotonic() < deadline and proc.poll() is None and len(running) < 2:
        time.sleep(0.1)
        if (out / STORE).is_file():
            try:
                running = [r for r in ResultStore(out / STORE).runs() if r["status"] == "running"]
            except (sqlite3.OperationalError, SgdgeomError):  # the sweep is creating it
                continue
    assert len(running) == 2, "the sweep's two workers did not start"

    second = sgdgeom("sweep", sweep, "--out", out, cwd=tmp_path)
    assert_one_line_error(second, rf"another sweep \(pid {proc.pid}\) is running on .*out")

    workers = _children(proc.pid)
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the killed sweep"

    store = ResultStore(out / STORE)
    written = {r["hash"]: len(store.epochs(r["hash"])) for r in store.runs()}
    time.sleep(2)
    assert {r["hash"]: len(store.epochs(r["hash"])) for r in store.runs()} == written
    assert sorted(r["status"] for r in store.runs()) == ["pending"] * 2 + ["running"] * 2


# ------------------------------------------------------------- 6. one-line errors

NO_FC9 = r"no weight layers named \['fc9'\]; the model's are fc1, out"


@pytest.mark.parametrize(
    ("sections", "pattern"),
    [
        (
            {"optimizer": {"name": "diffusion-metric-sgd", "lr": 0.05, "eps": 5}},
            r"eps = 5.* 1/λ_max",
        ),
        (
            {"optimizer": {"name": "diffusion-metric-sgd", "lr": 0.05, "eps": math.inf}},
            r"optimizer: eps must be 'auto' or a finite number >= 0, got inf",
        ),
        (
            {"loss": {"name": "pla", "R": 0.1, "layers": ["fc9"]}},
            NO_FC9,
        ),
        ({"monitor": {"temperature": {"layers": ["fc9"]}}}, NO_FC9),
        (
            {"optimizer": {"name": "sgd", "lr": 0.05, "nesterov": True}},
            r"optimizer: nesterov needs momentum > 0",
        ),
        ({"data": {"augment": "cifar10-crop"}}, r"'cifar10-crop' is made for cifar10, not digits"),
        ({"train": {"epochs": True}}, r"train.epochs: Input should be a valid integer"),
        ({"monitor": {"bogus": 1}}, r"monitor: unknown monitor 'bogus'; known: probe_size"),
        ({"seed": 2**70}, r"seed: Input should be less than 4294967296"),
        ({"model": {"name": "mlp", "widths": [0]}}, r"parameter fc1.weight is empty"),
        ({"model": {"name": "transformer", "depth": 0}}, r"needs depth >= 1 encoder layers"),
    ],
    ids=[
        "eps-5",
        "eps-inf",
        "loss-layers",
        "monitor-layers",
        "nesterov",
        "augment",
        "epochs-true",
        "monitor-bogus",
        "seed-overflow",
        "zero-width",
        "zero-depth",
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, sections, pattern):
    out = tmp_path / "out"
    path = config(tmp_path, **sections)
    proc = run_cli(tmp_path, "train", path, "--out", out, "--no-progress", outputs=(out,))
    assert_one_line_error(proc, pattern)
    assert not (out / "checkpoint.pt").exists()


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = yaml.safe_dump(TINY).replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.9\n")
    (tmp_path / "dup.yaml").write_text(text)
    proc = run_cli(tmp_path, "train", tmp_path / "dup.yaml", "--out", tmp_path / "out")
    assert_one_line_error(proc, r"dup.yaml: not valid YAML: .*duplicate key 'lr'")


def test_corrupt_run_folder_config_is_a_one_line_error(tmp_path):
    path, out = trained_run(tmp_path)
    (out / "config.yaml").write_text("data: [unclosed\n")
    proc = run_cli(tmp_path, "train", path, "--out", out, "--resume", outputs=(out,))
    assert_one_line_error(proc, r"config.yaml: not valid YAML")


def mnist_root(tmp_path: Path, labels: np.ndarray | None = None, images: int = 6) -> Path:
    root = tmp_path / "data"
    folder = make_mnist_root(root, n=(max(images, 1), 4))
    if labels is not None:
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels, compress=True)
    if images == 0:
        write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8), True)
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(0, np.uint8), True)
    return root


@pytest.mark.parametrize(
    ("labels", "images", "pattern"),
    [
        (np.array([0, 1, -1, 2, 3, 4], np.int8), 6, r"labels must lie in 0..9, found -1"),
        (np.array([0, 1, 250, 2, 3, 4], np.uint8), 6, r"labels must lie in 0..9, found 0..250"),
        (None, 0, r"the train IDX files hold no images"),
    ],
    ids=["label-minus-one", "label-250", "no-images"],
)
def test_bad_idx_contents_are_one_line_errors(tmp_path, labels, images, pattern):
    root = mnist_root(tmp_path, labels, images)
    path = config(tmp_path, data={"name": "mnist", "n_train": None, "n_test": None})
    proc = run_cli(tmp_path, "train", path, "--out", tmp_path / "o", "--data-root", root)
    assert_one_line_error(proc, pattern)


def test_corrupt_deflate_gz_is_a_one_line_error_and_listed_as_corrupt(tmp_path):
    root = mnist_root(tmp_path)
    target = root / "mnist" / "train-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[20:40] = b"\xff" * 20  # a valid gzip header over a broken deflate stream
    target.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 (what gzip raises varies; the reader must not)
        gzip.decompress(bytes(data))
    path = config(tmp_path, data={"name": "mnist", "n_train": None, "n_test": None})
    proc = run_cli(tmp_path, "train", path, "--out", tmp_path / "o", "--data-root", root)
    assert_one_line_error(proc, r"corrupt (gzip )?file .*train-images-idx3-ubyte.gz")
    listing = run_cli(tmp_path, "datasets", "--data-root", root)
    assert listing.returncode == 0, listing.stderr
    assert "mnist          corrupt" in listing.stdout
    assert "fashion-mnist  missing" in listing.stdout


# ------------------------------------------------------------- 8. size guards


def test_huge_grid_needs_yes_and_writes_nothing(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    grid = {"seed": list(range(1000)), "optimizer.lr": [0.01 * (i + 1) for i in range(1000)]}
    sweep = write_yaml(tmp_path / "sweep.yaml", {"name": "huge", "base": base, "grid": grid})
    start = time.perf_counter()
    proc = run_cli(tmp_path, "sweep", sweep, "--out", tmp_path / "out")
    assert_one_line_error(proc, r"the grid has 1,000,000 runs, more than 2,000; .* --yes")
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="10,000 runs"):
        expand_sweep(SweepConfig(name="s", base=base, grid={"seed": list(range(10_000))}), tmp_path)
    three = SweepConfig(name="s", base=base, grid={"seed": [0, 1, 2]})
    with pytest.raises(ConfigError, match="3 runs, more than 2"):
        expand_sweep(three, tmp_path, max_runs=2)
    assert len(expand_sweep(three, tmp_path, max_runs=None).runs) == 3


def test_eigvalsh_checks_memory_before_allocating(monkeypatch):
    from sgdgeom import diffusion

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    D = DiffusionMatrix(model, "cross_entropy", (x, y))
    monkeypatch.setattr(diffusion, "available_bytes", lambda device: 20 * 20 * 8)
    with pytest.raises(InputError, match=r"20 x 20 Gram matrix .* use D.eigsh\(k\)"):
        D.eigvalsh()
    monkeypatch.setattr(diffusion, "available_bytes", lambda device: None)
    assert D.eigvalsh().shape == (20,)


def test_table1_of_a_huge_model_reads_shapes_only(tmp_path):
    proc = run_cli(tmp_path, "table1", "--model", "fc", "--dataset", "mnist",
                   "--model-option", "width=200000")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "40,159,200,010" in proc.stdout


# ------------------------------------------------------------- 9. NaN on an epoch's last step


class PoisonLastStep(Callback):
    """Makes a weight infinite on the last step of epoch ``epoch``, as a diverging update
    would."""

    def __init__(self, epoch: int, steps_per_epoch: int) -> None:
        self.at = epoch * steps_per_epoch

    def on_step_end(self, trainer, x, y, loss):
        if trainer.step == self.at:
            with torch.no_grad():
                next(trainer.model.parameters())[0, 0] = math.inf


def test_nan_on_an_epochs_last_step_keeps_the_last_finite_checkpoint(tmp_path):
    data = load_dataset("digits").subset(64, 32)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10, widths=[8])
    trainer = Trainer(
        model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=3, batch_size=32,
        out_dir=tmp_path, progress=False, callbacks=[PoisonLastStep(2, 2)],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"became NaN or infinite in epoch 2; .*epoch 1"):
        trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert "NaN" not in text and "Infinity" not in text
    assert not (tmp_path / "final.json").exists()


# ------------------------------------------------------------- every checkpoint we write loads


class StopAfterFirstEpoch(Callback):
    """Stands in for a kill: fails on the first step of epoch 2, after epoch 1's checkpoint."""

    def on_step_begin(self, trainer, x, y):
        if trainer.epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}, {}),
        ({"name": "adam", "lr": 1e-3}, {}),
        ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}, {}),
        (
            {"name": "diffusion-metric-sgd", "lr": 0.05, "inverse": "exact"},
            {"monitor": {"temperature": {"snr": True}}},
        ),
        ({"name": "sam", "lr": 0.05}, {}),
        ({"name": "entropy-sgd", "lr": 0.05, "L": 2}, {}),
        ({"name": "sgd", "lr": 0.05}, {"loss": {"name": "pla", "R": 0.01, "y": 2}}),
    ],
    ids=["sgd-nesterov", "adam", "adamw", "diffusion-sgd-monitor", "sam", "entropy-sgd", "pla"],
)
def test_every_checkpoint_we_write_resumes_with_weights_only(tmp_path, optimizer, extra):
    from sgdgeom.experiments.config import parse_config
    from sgdgeom.experiments.runner import run_training

    cfg = parse_config({**TINY, "train": {"epochs": 2, "device": "cpu"}, "optimizer": optimizer,
                        **extra})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "run", callbacks=[StopAfterFirstEpoch()], progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = run_training(cfg, tmp_path / "run", resume=True, progress=False)
    whole = run_training(cfg, tmp_path / "whole", progress=False)
    assert resumed == whole


def test_a_sweep_without_its_data_stops_once_before_starting(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    base["data"] = {"name": "mnist", "batch_size": 32}
    sweep = write_yaml(
        tmp_path / "sweep.yaml", {"name": "s", "base": base, "grid": {"seed": list(range(40))}}
    )
    proc = run_cli(tmp_path, "sweep", sweep, "--out", tmp_path / "out")
    assert_one_line_error(proc, r"dataset 'mnist' is read from files: pass --data-root")
    assert not (tmp_path / "out").exists()
