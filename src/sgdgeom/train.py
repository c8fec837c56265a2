"""The training loop: evaluation, JSON-lines metrics, checkpoints and resume.

A :class:`Trainer` runs minibatch training on an in-memory :class:`~sgdgeom.data.Dataset`.
Everything that later work hooks into is a :class:`~sgdgeom.callbacks.Callback`: before and
after the step, after backward (the gradients are there), and at the end of an epoch (a
callback may add its own named metrics to the epoch's record). The monitors of
:mod:`sgdgeom.monitors` are callbacks.

Reproducibility and resume: the shuffling and torch's global random state are re-seeded at
the start of every epoch from ``(seed, epoch)``, so a run resumed from the checkpoint of
epoch ``e`` replays epoch ``e + 1`` exactly as an uninterrupted run would. Checkpoints and
metrics are written atomically at the end of each epoch; a NaN or infinite loss stops the
run with :class:`~sgdgeom.errors.NonFiniteLossError` and leaves the last good checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sgdgeom._deprecated import moved
from sgdgeom.callbacks import Callback
from sgdgeom.data import Dataset, batches
from sgdgeom.errors import CheckpointError, InputError, NonFiniteLossError, SgdgeomError
from sgdgeom.files import atomic_write_bytes, load_checkpoint, save_checkpoint, write_jsonl
from sgdgeom.optim.objectives import Objective, cross_entropy_objective

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "TEST_CORRECT", "Trainer", "resolve_device"]

__getattr__ = moved("sgdgeom.train", {"TensorBoardLogger": "sgdgeom.monitors"})

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
TEST_CORRECT = "test_correct.npy"
"""Which test images the model of the picked epoch classifies correctly, ``(n_test,)`` bool:
what a paired comparison of two runs on one test set needs (McNemar's discordant pairs)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SgdgeomError(
            "device 'cuda' was requested but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(device)


def _optimizer_signature(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and the plain hyperparameters of its groups, as built."""
    plain = (bool, int, float, str, type(None))
    groups = [
        {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in group.items()
            if key != "params"
            and (
                isinstance(value, plain)
                or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value))
            )
        }
        for group in optimizer.param_groups
    ]
    return {"class": type(optimizer).__name__, "groups": groups}


def _describe(signature: Any) -> str:
    """``Class(lr=..., momentum=...)`` of a signature (one read from a file may be anything)."""
    if not isinstance(signature, dict):
        return f"an unreadable optimizer record ({type(signature).__name__})"
    groups = signature.get("groups")
    first = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    keys = ("lr", "momentum", "weight_decay", "eps", "betas")
    shown = ", ".join(f"{k}={first[k]}" for k in keys if k in first)
    return f"{signature.get('class', '?')}({shown})"


class Trainer:
    """Minibatch training with evaluation, metrics, checkpoints and resume.

    Args:
        model: the network; moved to ``device``.
        dataset: an in-memory dataset; its train part is shuffled every epoch.
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters. One whose
            class sets ``requires_closure = True`` (SAM, Entropy-SGD) gets a closure that
            re-evaluates the objective on the step's minibatch.
        epochs: the number of epochs to train.
        batch_size: the minibatch size.
        objective: ``(model, x, y) -> (loss, logits)`` for one minibatch; cross-entropy by
            default. Partial local entropy and other losses plug in here.
        augment: a batched augmentation applied to training images before normalisation.
        callbacks: see :class:`~sgdgeom.callbacks.Callback`.
        out_dir: where ``metrics.jsonl``, ``checkpoint.pt``, ``final.json`` and
            ``test_correct.npy`` (:data:`TEST_CORRECT`) go; None keeps everything in memory.
        seed: seeds the shuffling and the global random state of every epoch.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm progress bar.
        run_id: what is trained, e.g. a hash of the config (the runner passes
            :func:`~sgdgeom.experiments.config.resume_key`). The checkpoint records it,
            and resuming refuses a checkpoint of another id, as it refuses one of another
            optimizer class or hyperparameters.

    Examples:
        >>> from sgdgeom.data import load_dataset
        >>> from sgdgeom.models import build_model
        >>> ds = load_dataset("digits").subset(256, 128)
        >>> model = build_model("mlp", ds.input_shape, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> final = Trainer(model, ds, opt, epochs=1, batch_size=32, progress=False).fit()
        >>> sorted(final)[:3]
        ['best_epoch', 'best_test_acc', 'device']
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        batch_size: int,
        objective: Objective = cross_entropy_objective,
        augment: nn.Module | None = None,
        callbacks: Sequence[Callback] = (),
        out_dir: str | Path | None = None,
        seed: int = 0,
        device: str = "auto",
        test_batch_size: int = 1000,
        progress: bool = True,
        run_id: str | None = None,
    ) -> None:
        if epochs < 1 or batch_size < 1 or test_batch_size < 1:
            raise InputError(
                f"epochs, batch_size and test_batch_size must be >= 1, got {epochs}, "
                f"{batch_size}, {test_batch_size}"
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.dataset = dataset
        self.optimizer = optimizer
        self.epochs = epochs
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.objective = objective
        self.augment = augment
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.progress = progress
        self.run_id = run_id
        self._signature = _optimizer_signature(optimizer)
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in all
        self.history: list[dict[str, Any]] = []
        self._picked_correct: Tensor | None = None  # test_correct at the picked epoch
        self._x_train = dataset.x_train.to(self.device)
        self._y_train = dataset.y_train.to(self.device)
        self._x_test = dataset.normalize(dataset.x_test.to(self.device))
        self._y_test = dataset.y_test.to(self.device)
        self._val = (
            (dataset.normalize(dataset.x_val.to(self.device)), dataset.y_val.to(self.device))
            if dataset.x_val is not None and dataset.y_val is not None
            else None
        )

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir is not None else None

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "epoch": self.epoch,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "callbacks": [cb.state_dict() for cb in self.callbacks],
                "history": self.history,
                "picked_test_correct": self._picked_correct,
                "run_id": self.run_id,
                "optimizer_signature": self._signature,
            },
        )

    def _resume(self) -> None:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return
        state = load_checkpoint(path, map_location=self.device)
        _check_run_checkpoint(path, state)
        self._check_origin(path, state)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            for callback, saved in zip(self.callbacks, state.get("callbacks", []), strict=False):
                callback.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"cannot resume from {path}: {first}") from None
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self._picked_correct = state.get("picked_test_correct")
        # Metrics of an epoch after the checkpoint were never confirmed: rewrite the log.
        self._write_metrics_log()

    def _check_origin(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another run: another ``run_id``, optimizer class or
        initial hyperparameters (loading it would silently train with its settings)."""
        saved_id = state.get("run_id")
        if self.run_id is not None and saved_id != self.run_id:
            whose = (
                "records no run id (an older sgdgeom or another program wrote it)"
                if saved_id is None
                else f"belongs to another run (run id {saved_id}, this run's is {self.run_id})"
            )
            raise CheckpointError(
                f"checkpoint {path} {whose}; resume it under its own config, or choose "
                f"another --out"
            )
        saved = state.get("optimizer_signature")
        if saved is not None and saved != self._signature:
            raise CheckpointError(
                f"checkpoint {path} was trained with {_describe(saved)}, but this run uses "
                f"{_describe(self._signature)}; resume it with its own optimizer, or choose "
                f"another --out"
            )

    def _write_metrics_log(self) -> None:
        if self.out_dir is not None:
            write_jsonl(self.out_dir / METRICS, self.history)

    # ------------------------------------------------------------------ loop

    def evaluate(self, part: str = "test") -> tuple[float, float]:
        """Mean cross-entropy and accuracy on the test part (``part="val"``: the
        validation part the dataset holds out)."""
        loss, correct = self._evaluate(part)
        return loss, int(correct.sum()) / len(correct)

    def _evaluate(self, part: str) -> tuple[float, Tensor]:
        """Mean cross-entropy and which samples are classified correctly, ``(n,)`` bool."""
        x_all, y_all = (self._x_test, self._y_test) if part == "test" else self._val or (None, None)
        if x_all is None or y_all is None:
            raise InputError(f"the dataset has no {part} part")
        self.model.eval()
        loss_sum, correct = 0.0, []
        with torch.no_grad():
            for x, y in batches(x_all, y_all, self.test_batch_size):
                logits = self.model(x)
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct.append(logits.argmax(1) == y)
        return loss_sum / len(y_all), torch.cat(correct).cpu()

    def _train_epoch(self, bar: tqdm) -> dict[str, float]:
        epoch = self.epoch + 1
        epoch_seed = self.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        self.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x_raw, y) in enumerate(
            batches(self._x_train, self._y_train, self.batch_size, generator=generator), 1
        ):
            x = self.augment(x_raw) if self.augment is not None else x_raw
            x = self.dataset.normalize(x)
            for cb in self.callbacks:
                cb.on_step_begin(self, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self.objective(self.model, x, y)
            value = loss.item()
            if not torch.isfinite(loss):
                self._stop_non_finite(f"the loss became {value} at epoch {epoch}, step {step}")
            loss.backward()
            for cb in self.callbacks:
                cb.on_after_backward(self, x, y, loss)
            if getattr(self.optimizer, "requires_closure", False):
                self.optimizer.step(self._closure(x, y))  # type: ignore[arg-type]
            else:
                self.optimizer.step()
            self.step += 1
            for cb in self.callbacks:
                cb.on_step_end(self, x, y, loss)
            loss_sum += value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen}

    def _check_finite(self, record: dict[str, Any]) -> None:
        """Stop before the epoch is recorded if a loss or a weight is NaN or infinite, so that
        the last checkpoint stays the last finite one."""
        bad = [k for k in ("train_loss", "test_loss") if not math.isfinite(record[k])]
        bad += [
            name
            for name, param in self.model.named_parameters()
            if not bool(torch.isfinite(param).all())
        ]
        if bad:
            named = f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
            self._stop_non_finite(f"{named} became NaN or infinite in epoch {self.epoch + 1}")

    def _stop_non_finite(self, what: str) -> None:
        kept = (
            f"the last good checkpoint is {self.checkpoint_path} (epoch {self.epoch})"
            if self.checkpoint_path is not None and self.epoch > 0
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(f"{what}; {kept}. Lower the learning rate or check the data.")

    def _closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        """For optimizers that re-evaluate the loss (SAM, Entropy-SGD): zero the gradients,
        recompute the objective on the same minibatch and backpropagate it."""

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss, _ = self.objective(self.model, x, y)
            loss.backward()
            return loss

        return closure

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for the remaining epochs and return the final summary.

        With ``resume=True`` it continues from ``out_dir/checkpoint.pt`` if there is one.
        The summary holds the final and best test accuracy and the epoch of the best.
        """
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume and (self.out_dir / CHECKPOINT).exists():
                raise InputError(
                    f"{self.out_dir} already holds a run: fit(resume=True) continues it; "
                    f"choose another out_dir to start a new one"
                )
        if resume:
            self._resume()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        steps_per_epoch = -(-len(self._y_train) // self.batch_size)
        with tqdm(
            total=steps_per_epoch * self.epochs,
            initial=steps_per_epoch * self.epoch,
            disable=not self.progress,
            desc="train",
            unit="step",
            leave=False,
        ) as bar:
            while self.epoch < self.epochs:
                start = time.perf_counter()
                record: dict[str, Any] = {"epoch": self.epoch + 1}
                record |= self._train_epoch(bar)
                if self._val is not None:
                    record["val_loss"], record["val_acc"] = self.evaluate("val")
                record["test_loss"], correct = self._evaluate("test")
                record["test_acc"] = int(correct.sum()) / len(correct)
                record["seconds"] = time.perf_counter() - start
                self._check_finite(record)
                self.epoch += 1
                for cb in self.callbacks:
                    cb.on_epoch_end(self, self.epoch, record)
                key = self._selection_key()
                if all(record[key] > earlier[key] for earlier in self.history):
                    self._picked_correct = correct  # the first best, as summary() picks
                self.history.append(record)
                self._save_checkpoint()
                self._write_metrics_log()
        final = self.summary()
        if self.out_dir is not None:
            atomic_write_bytes(self.out_dir / FINAL, json.dumps(final, indent=2).encode())
            self._write_test_correct(final)
        return final

    def _selection_key(self) -> str:
        """What picks the best epoch: the validation accuracy where the dataset holds a
        part out, else the test accuracy."""
        return "val_acc" if self._val is not None else "test_acc"

    def _write_test_correct(self, final: dict[str, Any]) -> None:
        """Write :data:`TEST_CORRECT` for the picked epoch. A run whose checkpoint predates
        it (finished by an older sgdgeom) gets it on resuming, where the picked epoch is the
        last one, whose model the checkpoint holds."""
        if self._picked_correct is None and final.get("best_epoch") == self.epoch:
            self._picked_correct = self._evaluate("test")[1]
        if self._picked_correct is not None and self.out_dir is not None:
            buffer = io.BytesIO()
            np.save(buffer, self._picked_correct.numpy().astype(bool), allow_pickle=False)
            atomic_write_bytes(self.out_dir / TEST_CORRECT, buffer.getvalue())

    def summary(self) -> dict[str, Any]:
        """Final and best accuracy of the epochs so far. The best epoch is picked on the
        validation part where the dataset holds one out (``selected_by: "val_acc"``), and
        ``best_test_acc`` is then the test accuracy *at that epoch*, the only test figure a
        pick may report; without one it is picked on the test part, as before.
        ``test_samples`` gives a test accuracy's binomial standard error,
        ``sqrt(p (1 − p) / test_samples)``; ``device`` is where the last epochs ran (a
        resumed run may have begun on another)."""
        if not self.history:
            return {"epochs": 0}
        key = self._selection_key()
        best = max(self.history, key=lambda r: r[key])
        last = self.history[-1]
        out = {
            "epochs": self.epoch,
            "final_test_acc": last["test_acc"],
            "final_test_loss": last["test_loss"],
            "final_train_loss": last["train_loss"],
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "selected_by": key,
            "test_samples": len(self._y_test),
            "device": str(self.device),
        }
        if key == "val_acc":
            out |= {"best_val_acc": best["val_acc"], "final_val_acc": last["val_acc"]}
        return out


def _check_run_checkpoint(path: Path, state: Any) -> None:
    """Refuse a checkpoint whose contents are not a run's, before any of it is used: the
    keys, their types, and a history of one record per epoch (``epoch`` 1, 2, …, as many
    as the checkpoint's epoch)."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is not a run's: {what}")

    if not isinstance(state, dict):
        raise refuse(f"it holds a {type(state).__name__}, not a mapping")
    missing = sorted({"epoch", "step", "model", "optimizer", "history"} - set(state))
    if missing:
        raise refuse(f"it lacks {', '.join(missing)}")
    for key in ("epoch", "step"):
        value = state[key]
        if type(value) is not int or value < 0:
            raise refuse(f"{key} is {value!r}, not a count (an int >= 0)")
    model, optimizer, history = state["model"], state["optimizer"], state["history"]
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise refuse("model is not a state dict (names to tensors)")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list)
            for g in optimizer["param_groups"]
        )
    ):
        raise refuse("optimizer is not an optimizer's state dict (state, param_groups)")
    if not isinstance(state.get("callbacks", []), list):
        raise refuse("callbacks is not a list")
    if not isinstance(history, list) or len(history) != state["epoch"]:
        raise refuse(f"history is not a list of {state['epoch']} epoch records")
    for number, record in enumerate(history, 1):
        if not isinstance(record, dict) or record.get("epoch") != number:
            raise refuse(f"history record {number} is not epoch {number}'s")
