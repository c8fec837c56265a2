"""The noise scale along training, and a check of its prediction (docs/guide/noise.md).

Run: ``python scripts/noise_use_case.py [--out docs] [--epochs 8]`` (about 10 minutes on 2
CPU cores). Writes ``benchmarks/noise-use-case.json`` and two figures under ``--out``.

1. **Along training.** The MNIST-5k MLP (784-256-256-10, ReLU) and the 2-block transformer
   (MNIST-5k digits as 28 tokens of 28 pixels), momentum SGD at B = 64, with
   :class:`~sgdgeom.monitors.NoiseScale` every 5 steps: ``B_noise`` in total and per layer,
   smoothed (β = 0.95), and the exact ``B_noise`` of the training set at the start and at the
   end (:func:`~sgdgeom.noise.dataset_noise`).
2. **The prediction.** McCandlish et al.'s ``S/S_min = 1 + B_noise/B``, with ``B_noise`` the
   exact one over the stretch of training the prediction is about (the mean of its values
   at initialisation and where a run at B = 64 first reaches the target training loss): the
   MLP trained to that loss at batch sizes ``B_noise/4`` and ``4 B_noise``, each with the
   best of four learning rates (the paper tunes it per batch size), and the ratio of the
   steps they took against the predicted ``(1 + B_noise/B_1) / (1 + B_noise/B_2)``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from sgdgeom import DiffusionMatrix
from sgdgeom.data import load_dataset
from sgdgeom.experiments.plots.common import pyplot
from sgdgeom.files import atomic_write_bytes, save_figure
from sgdgeom.models import build_model
from sgdgeom.monitors import NoiseScale
from sgdgeom.noise import dataset_noise, steps_ratio

TARGET_LOSS = 0.15  # the training loss both batch sizes must reach
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3)  # the best of these, per batch size


def model_of(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return build_model("fc", shape, 10, depth=2, width=256)
    return build_model("transformer", shape, 10, dim=64, depth=2, heads=4)


def exact_b_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    value = dataset_noise(DiffusionMatrix(model, "cross_entropy", (x, y), chunk_size=500)).b_noise
    model.train()
    return value


def along_training(name: str, x, y, epochs: int) -> dict:
    model = model_of(name, tuple(x.shape[1:]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = NoiseScale(model, every=5, decay=0.95)
    start = exact_b_noise(model, x, y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for begin in range(0, len(x) - 63, 64):
            index = order[begin : begin + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            monitor.record()
            opt.step()
    return {
        "exact_start": start,
        "exact_end": exact_b_noise(model, x, y),
        "history": monitor.history,
    }


def full_loss(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def steps_to_target(
    x, y, batch: int, lr: float, limit: int, model: nn.Module | None = None
) -> int | None:
    """Steps of momentum SGD at this batch size until the training loss is below
    :data:`TARGET_LOSS` (checked every few steps), or None within ``limit``; ``model`` (the
    MLP at its initialisation by default) is trained in place."""
    model = model if model is not None else model_of("mlp", tuple(x.shape[1:]))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    check = max(1, 256 // batch)
    for step in range(1, limit + 1):
        index = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        if not torch.isfinite(loss):
            return None
        loss.backward()
        opt.step()
        if step % check == 0 and full_loss(model, x, y) <= TARGET_LOSS:
            return step
    return None


def b_noise_over_the_run(x, y) -> dict:
    """The exact ``B_noise`` at initialisation and where a run at B = 64 reaches the target."""
    model = model_of("mlp", tuple(x.shape[1:]))
    start = exact_b_noise(model, x, y)
    steps = steps_to_target(x, y, 64, 0.03, limit=4000, model=model)
    end = exact_b_noise(model, x, y)
    return {"start": start, "at_target": end, "steps_at_64": steps, "mean": (start + end) / 2}


def prediction(x, y, b_noise: float) -> dict:
    out = {"b_noise": b_noise, "target_loss": TARGET_LOSS, "runs": {}}
    batches = [max(2, round(b_noise / 4)), round(4 * b_noise)]
    for batch in batches:
        best = None
        for lr in LEARNING_RATES:
            steps = steps_to_target(x, y, batch, lr, limit=4000)
            out["runs"][f"B={batch}, lr={lr}"] = steps
            if steps is not None and (best is None or steps < best):
                best = steps
        out[f"steps_B{batch}"] = best
    small, large = batches
    out["batches"] = batches
    predicted = steps_ratio(b_noise, small) / steps_ratio(b_noise, large)
    measured = out[f"steps_B{small}"] / out[f"steps_B{large}"] if out[f"steps_B{large}"] else None
    out["predicted_ratio"], out["measured_ratio"] = predicted, measured
    # the B_noise the measured ratio r implies: (1 + b/B_1) = r (1 + b/B_2)
    out["implied_b_noise"] = (measured - 1) / (1 / small - measured / large) if measured else None
    return out


def plot_along(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for ax, (name, result) in zip(axes, results.items(), strict=True):
        history = result["history"]
        steps = [r["step"] for r in history]
        layers = list(dict.fromkeys(k.split("/")[1] for k in history[-1] if k.count("/") == 2))
        for layer in layers[:: max(1, len(layers) // 5)]:  # at most six layers, in order
            values = [r.get(f"noise/{layer}/b_noise_smoothed", math.nan) for r in history]
            ax.semilogy(steps, values, lw=1, alpha=0.8, label=layer)
        total = [r["noise/b_noise_smoothed"] for r in history]
        ax.semilogy(steps, total, lw=2.5, color="k", label="total")
        ax.axhline(result["exact_end"], color="k", ls=":", lw=1, label="exact, end")
        ax.set_xlabel("step (B = 64)")
        ax.set_ylabel("B_noise (smoothed)")
        ax.set_title(
            f"{name}: exact B_noise {result['exact_start']:.3g} -> {result['exact_end']:.3g}"
        )
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    ds = load_dataset("mnist5k")
    x, y = ds.normalize(ds.x_train), ds.y_train
    started = time.perf_counter()
    results = {name: along_training(name, x, y, args.epochs) for name in ("mlp", "transformer")}
    plot_along(results, out / "figures" / "noise-scale-along-training.png")
    over_the_run = b_noise_over_the_run(x, y)
    check = prediction(x, y, over_the_run["mean"])
    check["b_noise_over_the_run"] = over_the_run
    small, large = check["batches"]
    check["predicted_at_start_and_target"] = [
        steps_ratio(over_the_run[k], small) / steps_ratio(over_the_run[k], large)
        for k in ("start", "at_target")
    ]
    summary = {
        "along_training": {
            name: {
                "exact_start": r["exact_start"],
                "exact_end": r["exact_end"],
                "final_smoothed": r["history"][-1]["noise/b_noise_smoothed"],
                "final_layers": {
                    k.split("/")[1]: v
                    for k, v in r["history"][-1].items()
                    if k.count("/") == 2 and k.endswith("b_noise_smoothed")
                },
            }
            for name, r in results.items()
        },
        "prediction": check,
        "seconds": time.perf_counter() - started,
    }
    path = out / "benchmarks" / "noise-use-case.json"
    atomic_write_bytes(path, json.dumps(summary, indent=1).encode())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
