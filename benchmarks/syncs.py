"""Count the host round-trips of a training step on a GPU.

Run: ``python benchmarks/syncs.py [--device cuda]``.

A host round-trip (``.item()``, ``float(t)``, ``bool(t)``, a copy to the CPU, an operation
whose output size depends on the data) makes the CPU wait until the GPU has run all the
work queued before it: the launches of the next operations cannot overlap the current
ones, which is most of a small model's step on a fast GPU. With
``torch.cuda.set_sync_debug_mode("warn")``, PyTorch warns at each such operation; this
script runs a few steps of each route, counts the warnings per step after the first two,
and prints the source line of each.

Routes: a plain momentum-SGD step (the baseline: none expected),
:class:`~sgdgeom.optim.DiffusionMetricSGD` weak and exact with ``eps="auto"`` and with a
fixed ε (eager and with ``sync="device"``), PLA y = 4 on fc2 (prefix and split) and ``D @ v`` on a
fresh batch. On the CPU there is nothing to count and the script says so.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import make_case, training_step

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.optim.local_entropy import PartialLocalEntropy


def routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], Callable]]:
    """Each route's setup: it builds the optimizer or loss and returns one step."""

    def ce() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def metric(**options: object) -> Callable[[], Callable]:
        def setup() -> Callable:
            opt = DiffusionMetricSGD(model, lr=1e-4, momentum=0.9, **options)
            return training_step(opt, ce)

        return setup

    def pla(route: str) -> Callable[[], Callable]:
        def setup() -> Callable:
            ple = PartialLocalEntropy(model, layers=["fc2"], R=0.01, y=4, batching=route)
            sgd = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
            return training_step(sgd, lambda: ple(x, y))

        return setup

    def diffusion_matvec() -> None:
        D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
        D @ torch.ones(D.shape[0], device=x.device)

    def sgd() -> Callable:
        return training_step(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), ce)

    return {
        "SGD step (baseline)": sgd,
        "metric weak, eps auto": metric(eps="auto", inverse="weak"),
        "metric exact, eps auto": metric(eps="auto", inverse="exact"),
        "metric weak, fixed eps": metric(eps=1e-3, inverse="weak"),
        "metric weak, eps auto, sync=device": metric(inverse="weak", sync="device"),
        "metric exact, eps auto, sync=device": metric(inverse="exact", sync="device"),
        "metric exact, fixed eps, sync=device": metric(eps=1e-3, inverse="exact", sync="device"),
        "PLA fc2 y=4 prefix": pla("prefix"),
        "PLA fc2 y=4 split": pla("split"),
        "D @ v, fresh batch": lambda: diffusion_matvec,
    }


def count_syncs(step: Callable, steps: int = 3) -> collections.Counter:
    """Source lines of the synchronising operations in ``steps`` steps, after two more."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    lines: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            lines[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", default="mlp")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        print("host round-trips are counted on a CUDA device only")
        return
    model, x, y = make_case(args.case, torch.device(args.device))
    steps = 3
    print(f"{args.case}, B = {len(x)}: host round-trips per step")
    for name, setup in routes(model, x, y).items():
        try:
            lines = count_syncs(setup(), steps)
        except TypeError as err:  # an option this version lacks
            print(f"{name:<44} skipped: {err}")
            continue
        where = ", ".join(f"{line} x{n / steps:g}" for line, n in lines.most_common())
        print(f"{name:<44} {sum(lines.values()) / steps:>5g}  {where}")


if __name__ == "__main__":
    main()
