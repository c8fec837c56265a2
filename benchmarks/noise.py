"""Benchmark the noise-scale monitor against a plain training step, in one run.

Run: ``python benchmarks/noise.py [--device cuda] [--cases mlp transformer] [--repeats 10]``.

Each row is a whole SGD step (``zero_grad``, forward, backward, ``step``), with the
:class:`~sgdgeom.monitors.NoiseScale` monitor recording after the backward: at every step,
and every 10 steps (timed over 10 consecutive steps, one of them measured). Models (see
``benchmarks/common.py``): Musso's 784-784-784-10 MLP on MNIST-5k at B = 256, the 2-block
transformer at B = 64, the CIFAR CNN and the ResNet-GN at B = 64; ``name:B`` takes another
batch. Ratios against the plain step of the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, make_case

from sgdgeom.monitors import NoiseScale


def stepper(case: str, device: torch.device, every: int | None, steps: int):
    """``steps`` SGD steps on one batch, with the monitor recording every ``every`` steps
    (None: no monitor)."""
    model, x, y = make_case(case, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    monitor = NoiseScale(model, every=every) if every is not None else None

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            if monitor is not None:
                monitor.record()
            opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{'case':<14} {'route':<26} {'per step':>10} {'x plain':>8}")
    for case in args.cases:
        rows = {
            "plain step": stepper(case, device, None, 10),
            "noise scale every step": stepper(case, device, 1, 10),
            "noise scale every 10": stepper(case, device, 10, 10),
        }
        times = interleaved_times(rows, device, repeats=args.repeats, warmup=1)
        base = times["plain step"]
        for name, seconds in times.items():
            print(f"{case:<14} {name:<26} {seconds / 10 * 1e3:>8.2f}ms {seconds / base:>8.3f}")


if __name__ == "__main__":
    main()
