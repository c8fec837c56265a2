"""The training loop: resume after SIGKILL, NaN stop, reproducibility, callbacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sgdgeom.callbacks import Callback
from sgdgeom.data import load_dataset
from sgdgeom.errors import ConfigError, NonFiniteLossError
from sgdgeom.experiments.config import parse_config
from sgdgeom.experiments.runner import run_training
from sgdgeom.files import read_jsonl
from sgdgeom.models import build_model
from sgdgeom.train import TEST_CORRECT, Trainer

CONFIG = {
    "name": "resume",
    "seed": 3,
    "data": {"name": "digits", "batch_size": 32, "n_train": 640, "n_test": 200},
    "model": {"name": "mlp", "widths": [32, 32]},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 4, "device": "cpu"},
}

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from sgdgeom.experiments.config import parse_config
    from sgdgeom.experiments.runner import run_training
    from sgdgeom.callbacks import Callback

    class KillMidEpoch(Callback):
        def on_step_end(self, trainer, x, y, loss):
            if trainer.epoch == 2 and trainer.step % 20 == 7:  # inside epoch 3
                os.kill(os.getpid(), signal.SIGKILL)

    config = parse_config({config!r})
    run_training(config, sys.argv[1], callbacks=[KillMidEpoch()], progress=False)
""")


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    config = parse_config(CONFIG)
    reference = run_training(config, tmp_path / "reference", progress=False)

    run_dir = tmp_path / "killed"
    script = KILLED_RUN.format(config=CONFIG)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)],
        capture_output=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
        check=False,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "final.json").exists()

    with pytest.raises(ConfigError, match="--resume"):
        run_training(config, run_dir, progress=False)
    resumed = run_training(config, run_dir, resume=True, progress=False)
    assert resumed == reference
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run_dir / "final.json").read_text()) == reference
    assert torch.equal(_test_correct(run_dir), _test_correct(tmp_path / "reference"))


def test_same_seed_same_run_other_seed_other_run():
    config = parse_config({**CONFIG, "train": {"epochs": 1, "device": "cpu"}})
    first = run_training(config, None, progress=False)
    assert run_training(config, None, progress=False) == first
    other = parse_config({**CONFIG, "seed": 4, "train": {"epochs": 1, "device": "cpu"}})
    assert run_training(other, None, progress=False) != first


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    dataset = load_dataset("digits").subset(128, 64)
    model = build_model("mlp", dataset.input_shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class PoisonSecondEpoch(Callback):
        def on_step_begin(self, trainer, x, y):
            if trainer.epoch == 1:
                with torch.no_grad():
                    trainer.model.out.bias.fill_(float("nan"))

    trainer = Trainer(
        model,
        dataset,
        optimizer,
        epochs=3,
        batch_size=32,
        out_dir=tmp_path,
        callbacks=[PoisonSecondEpoch()],
        progress=False,
        device="cpu",
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"nan at epoch 2, step 1; the last good "
        r"checkpoint is .*checkpoint.pt \(epoch 1\)",
    ):
        trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1
    assert torch.isfinite(state["model"]["out.bias"]).all()


def test_callbacks_see_every_hook_and_add_metrics():
    dataset = load_dataset("digits").subset(64, 32)
    model = build_model("mlp", dataset.input_shape, 10)
    calls = []

    class Recorder(Callback):
        def on_train_begin(self, trainer):
            calls.append("begin")

        def on_step_begin(self, trainer, x, y):
            calls.append("step")

        def on_after_backward(self, trainer, x, y, loss):
            assert trainer.model.out.weight.grad is not None
            calls.append("backward")

        def on_epoch_end(self, trainer, epoch, metrics):
            metrics["custom/epoch_squared"] = epoch**2

    trainer = Trainer(
        model,
        dataset,
        torch.optim.SGD(model.parameters(), lr=0.1),
        epochs=2,
        batch_size=32,
        callbacks=[Recorder()],
        progress=False,
        device="cpu",
    )
    trainer.fit()
    assert calls == ["begin"] + ["step", "backward"] * 4
    assert [r["custom/epoch_squared"] for r in trainer.history] == [1, 4]


@pytest.mark.slow
def test_quick_config_trains_mnist5k_mlp(tmp_path):
    """The README's first run: the 784-784-784-10 MLP on MNIST-5k, 3 epochs, > 85%."""
    from pathlib import Path

    from sgdgeom.experiments.config import load_config

    path = Path(__file__).parents[1] / "configs/quick/mnist5k-fc2-sgd.yaml"
    final = run_training(load_config(path), tmp_path, progress=False)
    assert final["epochs"] == 3
    assert final["final_test_acc"] > 0.85


PICKED = {  # validation picks epoch 5 of 6 (val 1.0, then 0.92): not the last
    **CONFIG,
    "data": {"name": "digits", "batch_size": 32, "n_train": 640, "n_test": 200, "n_val": 100},
    "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
    "train": {"epochs": 6, "device": "cpu"},
}


def _test_correct(run_dir) -> torch.Tensor:
    return torch.from_numpy(np.load(run_dir / TEST_CORRECT, allow_pickle=False))


def test_test_correct_is_that_of_the_picked_epoch(tmp_path):
    """test_correct.npy holds the model of the picked epoch, not the last one: a run
    stopped at the picked epoch (same seed, so the same weights) classifies exactly it."""
    final = run_training(parse_config(PICKED), tmp_path / "full", progress=False)
    assert final["best_epoch"] == 5 < final["epochs"]
    correct = _test_correct(tmp_path / "full")
    assert correct.dtype == torch.bool and correct.shape == (final["test_samples"],)
    assert int(correct.sum()) / len(correct) == final["best_test_acc"]
    assert final["device"] == "cpu"  # where it ran: runs of one store may come from several
    stopped = parse_config({**PICKED, "train": {"epochs": 5, "device": "cpu"}})
    trainer_dir = tmp_path / "stopped"
    run_training(stopped, trainer_dir, progress=False)
    model = build_model("mlp", (64,), 10, widths=[32, 32])
    model.load_state_dict(torch.load(trainer_dir / "checkpoint.pt", weights_only=True)["model"])
    dataset = load_dataset("digits").subset(640, 200)
    with torch.no_grad():
        again = model(dataset.normalize(dataset.x_test)).argmax(1) == dataset.y_test
    assert torch.equal(correct, again)


@pytest.mark.parametrize(("config", "written"), [(CONFIG, True), (PICKED, False)])
def test_resuming_a_run_older_than_test_correct(tmp_path, config, written):
    """A run finished before sgdgeom kept test_correct gets it on resuming where its
    checkpoint holds the picked epoch's model (the last), and only there."""
    parsed = parse_config(config)
    final = run_training(parsed, tmp_path, progress=False)
    assert (final["best_epoch"] == final["epochs"]) is written
    kept = _test_correct(tmp_path)
    (tmp_path / TEST_CORRECT).unlink()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["picked_test_correct"]  # as an older sgdgeom wrote it
    torch.save(state, tmp_path / "checkpoint.pt")
    assert run_training(parsed, tmp_path, resume=True, progress=False) == final
    assert (tmp_path / TEST_CORRECT).exists() is written
    if written:
        assert torch.equal(_test_correct(tmp_path), kept)
