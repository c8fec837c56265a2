"""The second adversary's findings against the files, the command line and the store.

Each case reproduces a finding and asserts what must happen instead: a one-line message
and exit status 2 on the command line (nothing changed outside ``--out``), or the
library's error naming the problem. The library's silent wrong steps are in
``tests/test_silent_steps.py`` and the recurrent layers in ``tests/test_recurrent.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sgdgeom.data import load_dataset, read_cifar10_batch, read_idx
from sgdgeom.errors import CheckpointError, ConfigError, DatasetError, InputError, SgdgeomError
from sgdgeom.experiments.compare import load_comparison, plot_curves
from sgdgeom.experiments.config import config_hash, parse_config, read_yaml
from sgdgeom.experiments.kinds import KINDS, check_out
from sgdgeom.experiments.rbm import RBMConfig, run_rbm
from sgdgeom.experiments.report import write_report
from sgdgeom.experiments.runner import run_training
from sgdgeom.experiments.steady_state import SteadyStateConfig
from sgdgeom.experiments.store import STORE, ResultStore
from sgdgeom.experiments.sweep import load_sweep
from sgdgeom.experiments.temperature import write_temperature_report
from sgdgeom.files import read_jsonl, save_checkpoint
from sgdgeom.linalg import krylov, top_eigenpairs
from sgdgeom.models import build_model
from sgdgeom.monitors.current import CurrentOptions
from sgdgeom.persample.storage import DiskChunks, reclaim_stale_captures
from tests.test_cli import assert_one_line_error
from tests.test_data import make_mnist_root, write_idx
from tests.test_faults import TINY, config, run_cli, write_yaml

# ------------------------------------------------------------------ configs


def test_yaml_floats_are_read_as_yaml_1_2_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    text = yaml.safe_dump(TINY).replace("lr: 0.05", "lr: 1e-3")
    path.write_text(text + "extra: 1e308\n")
    data = read_yaml(path)
    assert data["optimizer"]["lr"] == 1e-3 and data["extra"] == 1e308
    del data["extra"]
    assert parse_config(data, "c").optimizer.lr == 1e-3
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # PyYAML itself is left as it is


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                for p, c in zip("abcdefg", "bcdefgh", strict=True)
            ),
            "expands to more than 100,000 values",
        ),
        ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests deeper than 64 levels"),
        ("a: !!set {4: null}\n", "a set .* is not config data"),
        ("a: !!binary aGVsbG8=\n", "a bytes .* is not config data"),
    ],
    ids=["alias-bomb", "deep", "set", "binary"],
)
def test_hostile_yaml_is_refused_quickly(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)
    assert time.perf_counter() - started < 5


def test_a_yaml_model_option_of_a_set_is_one_line(tmp_path):
    out = tmp_path / "s"
    proc = run_cli(
        tmp_path, "spectrum", "--model", "mlp", "--dataset", "digits", "--n", "16",
        "--model-option", "widths=!!set {4: null}", "--out", out,
    )  # fmt: skip
    assert_one_line_error(proc, r"option 'widths=!!set \{4: null\}': a set")
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bins": 4000}, "476.8 GiB"),
        ({"walkers": 4_000_000_000}, "9.60e\\+12 walker-steps"),
        ({"t_burn": 1e9}, "walker-steps"),
    ],
)
def test_steady_state_work_is_bounded_before_it_starts(change, message):
    with pytest.raises(ValueError, match=message):
        SteadyStateConfig(name="s", **change)


def test_current_probes_are_bounded():
    with pytest.raises(ValueError, match="less than or equal to 4096"):
        CurrentOptions(probes=100_000_000)


def test_a_model_too_large_is_refused_before_it_allocates():
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"39,750,000,010 parameters \(148.1 GiB"):
        build_model("mlp", (1, 28, 28), 10, widths=(50_000_000,))
    assert time.perf_counter() - started < 5


def test_comparison_names_must_be_strings(tmp_path):
    base = {k: v for k, v in json.loads(json.dumps(TINY)).items() if k != "name"}
    for data, message in (
        ({"name": 3, "base": base, "variants": {"a": {}}}, "name must be a string"),
        ({"name": "c", "base": base, "variants": {4: {}}}, "variant 4: names are strings"),
        ({"name": "c", "base": base, "variants": {"a": [1]}}, "maps to a mapping"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_comparison(write_yaml(tmp_path / "c.yaml", data))


# ------------------------------------------------------------------ checkpoints


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    parsed = parse_config(json.loads(json.dumps(TINY)), "tiny")
    run_training(parsed, out, progress=False)
    return parsed, out


BAD_CHECKPOINTS = {
    "epoch -5": (lambda s: s | {"epoch": -5}, "epoch is -5, not a count"),
    "epoch 1e9": (lambda s: s | {"epoch": 10**9}, "history is not a list of 1000000000"),
    "epoch 'abc'": (lambda s: s | {"epoch": "abc"}, "epoch is 'abc'"),
    "epoch 1.5": (lambda s: s | {"epoch": 1.5}, "epoch is 1.5"),
    "history malformed": (lambda s: s | {"history": [[1, 2]]}, "record 1 is not epoch 1's"),
    "model a tensor": (lambda s: s | {"model": torch.zeros(3)}, "model is not a state dict"),
    "optimizer malformed": (lambda s: s | {"optimizer": {"state": 1}}, "optimizer is not"),
    "callbacks malformed": (lambda s: s | {"callbacks": "x"}, "callbacks is not a list"),
    "a list": (lambda s: [1, 2], "holds a list, not a dict"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_checkpoint_with_wrong_contents_is_refused_before_use(finished_run, tmp_path, case):
    parsed, out = finished_run
    change, message = BAD_CHECKPOINTS[case]
    target = tmp_path / "run"
    target.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (target / name).write_bytes((out / name).read_bytes())
    save_checkpoint(target / "checkpoint.pt", change(_checkpoint(out)))
    with pytest.raises(CheckpointError, match=message):
        run_training(parsed, target, resume=True, progress=False)


def test_a_text_or_one_byte_checkpoint_is_one_line(finished_run, tmp_path):
    parsed, out = finished_run
    target = tmp_path / "run"
    target.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (target / name).write_bytes((out / name).read_bytes())
    (target / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a checkpoint, or is corrupt"):
        run_training(parsed, target, resume=True, progress=False)
    (target / "checkpoint.pt").write_bytes(b"\x80")  # torch's unpickler: an IndexError
    proc = run_cli(tmp_path, "train", config(tmp_path), "--out", target, "--resume",
                   outputs=(target,))  # fmt: skip
    assert_one_line_error(proc, r"checkpoint\.pt .*(truncated or corrupt|not a checkpoint)")


# ------------------------------------------------------------------ the result store


def _store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "sweep" / STORE)
    store.register(
        "demo",
        [{"hash": "h1", "name": "a", "labels": {"seed": 0}, "config": {}, "run_dir": "runs/a"}],
        [{"kind": "curves"}],
    )
    store.start("h1", resumed_from=0)
    store.record_epoch("h1", {"epoch": 1, "test_acc": 0.5, "train_loss": 1.0})
    store.finish("h1", {"final_test_acc": 0.5, "best_test_acc": 0.5, "best_epoch": 1})
    return store


STORE_DAMAGE = {
    "final NULL": ("UPDATE runs SET final=NULL", "finished without final metrics"),
    "final not JSON": ("UPDATE runs SET final='{oops'", "final is not a JSON dict"),
    "labels a list": ("UPDATE runs SET labels='[1]'", "labels is not a JSON dict"),
    "name a blob": ("UPDATE runs SET name=x'00'", "name is not text"),
    "status unknown": ("UPDATE runs SET status='odd'", "status 'odd' is not one of"),
    "plots malformed": ("UPDATE sweeps SET plots='[1, 2]'", "plots is not a list of figures"),
    "plots not JSON": ("UPDATE sweeps SET plots='x'", "plots is not a JSON list"),
    "metrics malformed": ("UPDATE epochs SET metrics='[]'", "metrics is not a JSON dict"),
    "metrics of another epoch": (
        """UPDATE epochs SET metrics='{"epoch": 7}'""",
        "metrics of another",
    ),
    "a view for a table": (
        "ALTER TABLE epochs RENAME TO e2; CREATE VIEW epochs AS SELECT * FROM e2",
        "epochs is not a table \\(it is view\\)",
    ),
    "an older schema": ("ALTER TABLE runs DROP COLUMN run_dir", "table runs lacks run_dir"),
}


@pytest.mark.parametrize("case", list(STORE_DAMAGE))
def test_a_damaged_store_is_refused_naming_what_is_wrong(tmp_path, case):
    store = _store(tmp_path)
    statement, message = STORE_DAMAGE[case]
    db = sqlite3.connect(store.path)
    db.executescript(statement)
    db.commit()
    db.close()
    with pytest.raises(SgdgeomError, match=message):
        write_report(store.path, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_a_damaged_store_is_one_line_on_the_command_line(tmp_path):
    store = _store(tmp_path)
    db = sqlite3.connect(store.path)
    db.execute("UPDATE runs SET final=NULL")
    db.commit()
    db.close()
    proc = run_cli(tmp_path, "report", store.path.parent, "--out", tmp_path / "r.html")
    assert_one_line_error(proc, "finished without final metrics")


def test_a_full_disk_under_the_store_is_one_line(tmp_path, monkeypatch):
    store = _store(tmp_path)
    real = sqlite3.connect

    class Full:
        def __init__(self, *args, **kwargs):
            self.db = real(*args, **kwargs)

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    monkeypatch.setattr(sqlite3, "connect", Full)
    with pytest.raises(SgdgeomError, match="disk is full; free some space, then run the sweep"):
        store.record_epoch("h1", {"epoch": 2})


def test_a_report_reads_its_store_and_writes_only_its_page(tmp_path):
    store = _store(tmp_path)
    folder = store.path.parent
    (folder / "figures").symlink_to(tmp_path, target_is_directory=True)  # planted
    for path in [folder, *folder.iterdir()]:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)  # a read-only store
    try:
        elsewhere = tmp_path / "elsewhere"
        proc = run_cli(tmp_path, "report", folder, "--out", elsewhere / "r.html",
                       outputs=(elsewhere,))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in elsewhere.iterdir()) == ["r.html"]
        assert "data:image/png;base64" in (elsewhere / "r.html").read_text()
    finally:
        folder.chmod(0o755)


def test_report_sections_that_hang_or_recurse_are_refused(tmp_path):
    store = _store(tmp_path)
    folder = store.path.parent
    os.mkfifo(folder / "pipe.png")
    (folder / "sections.json").write_text(json.dumps([{"title": "t", "images": ["pipe.png"]}]))
    with pytest.raises(InputError, match="pipe.png is not a regular file"):
        write_report(folder, tmp_path / "r.html")
    (folder / "sections.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="not a list of report sections"):
        write_report(folder, tmp_path / "r.html")


def test_malformed_json_files_of_a_run_are_named(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\n[1, 2]\n{"epoch": 3}\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        read_jsonl(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_jsonl(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\n{"epo')  # torn by a kill: skipped
    assert read_jsonl(tmp_path / "m.jsonl") == [{"epoch": 1}]
    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": "x"}\n')
    with pytest.raises(InputError, match="a number for train_loss"):
        plot_curves(tmp_path, {"a": "a"}, tmp_path / "c.png")


def test_compare_refuses_an_edited_config_over_its_finished_runs(tmp_path):
    base = {k: v for k, v in json.loads(json.dumps(TINY)).items() if k != "name"}
    comparison = {"name": "c", "base": base, "variants": {"a": {}}}
    path = write_yaml(tmp_path / "compare.yaml", comparison)
    out = tmp_path / "out"
    proc = run_cli(tmp_path, "compare", path, "--out", out, outputs=(out,))
    assert proc.returncode == 0, proc.stderr
    comparison["base"]["optimizer"]["lr"] = 0.01
    write_yaml(path, comparison)
    before = (out / "summary.json").read_text()
    proc = run_cli(tmp_path, "compare", path, "--out", out, outputs=(out,))
    assert_one_line_error(proc, r"holds a run of a different config; choose another --out")
    assert (out / "summary.json").read_text() == before


def test_a_finished_out_of_another_config_is_not_overwritten(tmp_path):
    out = tmp_path / "s"
    first = ["spectrum", "--model", "mlp", "--dataset", "digits", "--n", "24", "--out", out]
    proc = run_cli(tmp_path, *first, outputs=(out,))
    assert proc.returncode == 0, proc.stderr
    report = (out / "spectrum.json").read_text()
    proc = run_cli(tmp_path, *first[:-3], "32", "--out", out, outputs=(out,))
    assert_one_line_error(proc, "holds the results of another spectrum config")
    assert (out / "spectrum.json").read_text() == report
    check_out(out, "spectrum", KINDS["spectrum"].parse({"model": "mlp", "dataset": "digits",
              "n": 24}, "spectrum"))  # fmt: skip  # the same config may run again


def test_a_sweep_never_writes_through_a_planted_link(tmp_path):
    base = {k: v for k, v in json.loads(json.dumps(TINY)).items() if k != "name"}
    sweep = write_yaml(tmp_path / "sweep.yaml", {"name": "k", "base": base})
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    (run_dir,) = [Path(spec.run_dir) for spec in load_sweep(sweep, out).runs]
    run_dir.parent.mkdir(parents=True)
    run_dir.symlink_to(victim, target_is_directory=True)
    proc = run_cli(tmp_path, "sweep", sweep, "--out", out, outputs=(out,))
    assert_one_line_error(proc, rf"run folder .*runs/{run_dir.name} is a symbolic link")
    assert list(victim.iterdir()) == []


# ------------------------------------------------------------------ experiments


def test_rbm_batch_larger_than_the_data_is_refused(tmp_path):
    config_ = RBMConfig(name="r", n_train=20, batch_size=32, epochs=1, n_hidden=4)
    with pytest.raises(InputError, match="batch_size 32 is larger than the 20 training"):
        run_rbm(config_, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="at least 1 item"):
        RBMConfig(name="r", updates=[])


# ------------------------------------------------------------------ data files


def test_idx_sizes_that_wrap_or_inflate_are_refused_before_allocating(tmp_path):
    header = b"\x00\x00\x08\x04" + struct.pack(">IIII", *[2**32 - 1] * 4)
    (tmp_path / "wrap").write_bytes(header + bytes(16))
    with pytest.raises(DatasetError, match="declares 340,282,366,"):
        read_idx(tmp_path / "wrap")
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 3_000_000, 1000, 1)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = (
        compressor.compress(header)
        + b"".join(compressor.compress(bytes(2**24)) for _ in range(4))
        + compressor.flush()
    )
    (tmp_path / "bomb.gz").write_bytes(bomb)
    started = time.perf_counter()
    with pytest.raises(DatasetError, match="declares 3,000,000,000 bytes"):
        read_idx(tmp_path / "bomb.gz")
    assert time.perf_counter() - started < 2


def test_train_and_test_images_of_different_shapes_are_refused(tmp_path):
    root = tmp_path / "data"
    make_mnist_root(root)
    write_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((4, 27, 28), np.uint8), True)
    out = tmp_path / "o"
    proc = run_cli(
        tmp_path, "spectrum", "--model", "mlp", "--dataset", "mnist", "--n", "4",
        "--data-root", root, "--out", out,
    )  # fmt: skip
    assert_one_line_error(proc, r"train images \(1, 28, 28\), test images \(1, 27, 28\)")


def test_a_small_cifar_batch_cannot_ask_for_gigabytes(tmp_path):
    reconstruct, arguments, _ = np.zeros(10, np.uint8).__reduce__()

    class Evil:  # numpy's own pickle of an array, its state asking for 12 GB
        def __reduce__(self):
            state = (1, (100_000, 3072, 40), np.dtype(np.uint8), False, bytes(10))
            return (reconstruct, arguments, state)

    raw = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    (tmp_path / "batch").write_bytes(raw)
    assert len(raw) < 400
    with pytest.raises(DatasetError, match=r"12,288,000,000 bytes\) with 10 bytes of data"):
        read_cifar10_batch(tmp_path / "batch")


# ------------------------------------------------------------------ memory and kills


def test_block_lanczos_is_bounded_by_free_memory(monkeypatch):
    dim, block = 2000, 12
    A = torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A @ A.T

    def free(passes):
        monkeypatch.setattr(
            krylov,
            "available_bytes",
            lambda device: 2 * krylov.krylov_bytes(dim, block, passes, A.dtype),
        )

    free(2)
    with pytest.raises(InputError, match="needs .* GiB for its first three passes"):
        top_eigenpairs(lambda V: A @ V, dim, 2, A.dtype, block=block)
    free(5)
    with pytest.warns(UserWarning, match="stopping after 5 passes"):
        pairs = top_eigenpairs(lambda V: A @ V, dim, 2, A.dtype, block=block, max_passes=60)
    assert pairs.passes <= 5


def test_single_vector_lanczos_is_refused_where_its_basis_would_not_fit(monkeypatch):
    dim = 3000
    A = torch.diag(torch.linspace(1, 2, dim, dtype=torch.float64))
    monkeypatch.setattr(krylov, "available_bytes", lambda device: krylov.arpack_bytes(dim, 3))
    with pytest.raises(InputError, match=r"ARPACK.*GiB of float64 vectors.*randomized"):
        top_eigenpairs(lambda V: A @ V, dim, 3, A.dtype, method="lanczos")
    monkeypatch.setattr(krylov, "available_bytes", lambda device: 2 * krylov.arpack_bytes(dim, 3))
    pairs = top_eigenpairs(lambda V: A @ V, dim, 3, A.dtype, method="lanczos")
    assert pairs.values.tolist() == pytest.approx([2.0, 2.0 - 1 / 2999, 2.0 - 2 / 2999])


def test_a_killed_runs_captures_are_reclaimed_at_the_next_start(tmp_path):
    stale = tmp_path / "captures-dead"
    stale.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stale / "owner").write_text(f"{dead.pid} 1")
    (stale / "00000000.npy").write_bytes(b"x")
    live = tmp_path / "captures-live"
    live.mkdir()
    (live / "owner").write_text((Path("/proc/self/stat").exists() and _identity()) or "")
    unowned = tmp_path / "captures-unowned"
    unowned.mkdir()
    chunks = DiskChunks(tmp_path)
    assert not stale.exists() and live.exists() and unowned.exists()
    assert chunks.folder.exists() and (chunks.folder / "owner").is_file()
    assert reclaim_stale_captures(tmp_path) == []  # its own folder's owner is alive


def _identity() -> str:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return f"{os.getpid()} {fields[19]}"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigint_stops_a_sweep_and_marks_its_runs_interrupted(tmp_path):
    base = {k: v for k, v in json.loads(json.dumps(TINY)).items() if k != "name"}
    base["data"] = {"name": "digits", "batch_size": 8}
    base["train"] = {"epochs": 500, "device": "cpu"}
    sweep = write_yaml(
        tmp_path / "sweep.yaml", {"name": "k", "base": base, "grid": {"seed": [0, 1, 2, 3]}}
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sgdgeom", "sweep", str(sweep), "--out", str(out),
               "--workers", "2", "--threads", "1"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w")  # a pipe nobody reads could fill and block it
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=log,
        # a shell's background job ignores SIGINT, and a child inherits that: the sweep
        # must be started as from a terminal, where Ctrl-C reaches it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    running: list = []
    while time.monotonic() < deadline and proc.poll() is None and len(running) < 2:
        time.sleep(0.2)
        try:
            runs = ResultStore(out / STORE, read_only=True).runs()
        except SgdgeomError:
            continue
        running = [r for r in runs if r["status"] == "running" and r["attempts"]]
        epochs = [len(ResultStore(out / STORE, read_only=True).epochs(r["hash"])) for r in running]
        if len(running) == 2 and min(epochs) < 1:
            running = []  # wait for a first epoch (a checkpoint) of both
    assert len(running) == 2, "the sweep's two workers did not start"
    os.kill(proc.pid, signal.SIGINT)
    started = time.monotonic()
    proc.wait(timeout=60)
    log.close()
    assert proc.returncode == 130
    assert time.monotonic() - started < 30  # no queued run trained on (each takes minutes)
    statuses = sorted(r["status"] for r in ResultStore(out / STORE, read_only=True).runs())
    assert statuses == ["interrupted"] * 2 + ["pending"] * 2
    assert "numba" not in (tmp_path / "stderr.txt").read_text()


def test_malformed_temperature_metrics_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "temperature/fc1/signal": 0.1, "temperature/fc1/noise": "x"}\n'
    )
    with pytest.raises(InputError, match="lacks a number for temperature/fc1/noise"):
        write_temperature_report(tmp_path)


# ------------------------------------------------------------------ a validation part


def test_a_validation_part_picks_the_best_epoch_and_the_test_is_only_reported(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["data"] |= {"n_train": 160, "n_val": 40}
    data["train"]["epochs"] = 3
    parsed = parse_config(data, "tiny")
    final = run_training(parsed, tmp_path / "run", progress=False)
    history = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    best = max(history, key=lambda r: r["val_acc"])
    assert final["selected_by"] == "val_acc" and final["best_epoch"] == best["epoch"]
    assert final["best_test_acc"] == best["test_acc"] and final["best_val_acc"] == best["val_acc"]
    without = parse_config(json.loads(json.dumps(TINY)), "tiny")
    content = without.model_dump(mode="json")
    for key in ("n_val", "normalize"):  # the hash of a config without them is as before
        del content["data"][key]
    expected = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(without) == expected != config_hash(parsed)


def test_the_validation_part_is_held_out_of_the_training_part():
    full = load_dataset("digits").subset(100, 20)
    held = full.hold_out(30)
    assert len(held.y_train) == 70 and len(held.y_val) == 30 and len(held.y_test) == 20
    assert torch.equal(held.x_val, full.x_train[70:]) and torch.equal(
        held.x_train, full.x_train[:70]
    )
    with pytest.raises(DatasetError, match="n_val=100 is out of range"):
        full.hold_out(100)


def test_raw_inputs_keep_the_stored_pixels_and_old_hashes():
    full = load_dataset("digits").subset(100, 20)
    x = full.x_train[:5]
    assert torch.equal(full.raw().normalize(x), x) and not torch.equal(full.normalize(x), x)
    data = json.loads(json.dumps(TINY))
    data["data"]["normalize"] = False
    raw = parse_config(data, "raw")
    standard = parse_config(json.loads(json.dumps(TINY)), "tiny")
    assert config_hash(raw) != config_hash(standard)
    content = standard.model_dump(mode="json")
    for key in ("n_val", "normalize"):
        del content["data"][key]
    expected = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(standard) == expected
