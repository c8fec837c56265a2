"""Benchmark the overhead of LayerTemperature on a training step, in one run.

Run: ``python benchmarks/monitor.py [--device cuda]``.

Musso's Fig. 1 network, the 4-hidden-layer 784-wide FC net, on MNIST-5k digits at B = 64
(as in the quick Fig. 1 configs). Each route is a whole step (zero_grad, forward, backward,
the callback's after-backward hook, SGD step); the baseline has no callback. The reference
route reads every weight gradient once with torch's cheapest reduction (a sum): any monitor
of the gradients reads them at least once, the floor of its overhead. The diffusion trace
(every K epochs on a probe set) is not part of a step and is not counted here.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times

from sgdgeom.data import load_dataset
from sgdgeom.models import build_model
from sgdgeom.monitors import LayerTemperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ds = load_dataset("mnist5k")
    x, y = ds.normalize(ds.x_train[:64]).to(device), ds.y_train[:64].to(device)
    template = build_model("fc", ds.input_shape, 10, depth=4).to(device)

    class ReadOnce:
        """One read of the weight gradients (torch's sum), nothing kept: what any
        per-step monitor of the gradients costs at least."""

        def on_train_begin(self, trainer: SimpleNamespace) -> None:
            self.weights = [p for p in trainer.model.parameters() if p.dim() > 1]

        def on_after_backward(self, *_: object) -> None:
            torch.stack([w.grad.sum() for w in self.weights])

    def route(callback: LayerTemperature | ReadOnce | None) -> Callable[[], None]:
        model = copy.deepcopy(template)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        trainer = SimpleNamespace(model=model)
        if callback is not None:
            callback.on_train_begin(trainer)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if callback is not None:
                callback.on_after_backward(trainer, x, y, loss)
            opt.step()

        return step

    steps = {
        "plain step (baseline)": route(None),
        "one read: torch sum of the weight grads": route(ReadOnce()),
        "LayerTemperature, signal and noise": route(LayerTemperature(snr=False)),
        "LayerTemperature, with SNR sums": route(LayerTemperature(snr=True)),
    }
    times = interleaved_times(steps, device, args.repeats)
    base = times["plain step (baseline)"]
    d = sum(p.numel() for p in template.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n4x784 FC net: d = {d:,}, B = {len(x)}, {device}")
    for name, seconds in times.items():
        print(
            f"{name:<40} {seconds * 1e3:>8.2f}ms {seconds / base:>7.3f} x base "
            f"(overhead {100 * (seconds / base - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
