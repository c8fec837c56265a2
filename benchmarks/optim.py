"""Benchmark DiffusionMetricSGD against a plain SGD step, in one run.

Run: ``python benchmarks/optim.py [--device cuda]``.

Cases (``--cases``, see ``common.make_case``): Musso's 784-784-784-10 MLP on MNIST-5k
digits at B = 256, the 2-block transformer and the ResNet-GN at B = 64. Every route is a
whole training step (zero_grad, forward, backward, optimizer step); the baseline is
``torch.optim.SGD`` with momentum. Routes:

- default, weak / exact, ε auto: ``DiffusionMetricSGD(model, lr, eps="auto", mode=…)``
  as constructed by default: fused (the metric gradient in place of the weight
  gradients, which the backward skips), the B x B Gram matrix every step;
- the same with a fixed ε (weak): no Gram matrix when ε tr D < 1;
- unfused (``fused=False``), weak / exact: the weight gradients in the backward too;
- closure route, weak: the route for parameters without the model, which materialises
  the per-sample gradients (B x d) with one batched backward.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    interleaved_times,
    make_case,
    median_time,
    print_table,
    report_peak_rss,
    resident_mib,
    route_memory,
)

from sgdgeom.optim import DiffusionMetricSGD

BASELINE = "SGD step (baseline)"
CLOSURE = "closure route, weak, eps auto"


def routes(template: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    """Each route trains its own copy of the model, so no route runs another's hooks."""

    def attached(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable:
        def setup():
            model = copy.deepcopy(template)
            opt = make_optimizer(model)

            def step():
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            return step

        return setup

    def closure_route():
        model = copy.deepcopy(template)
        opt = DiffusionMetricSGD(list(model.parameters()), lr=1e-4, momentum=0.9, eps="auto")

        def step():
            opt.zero_grad(set_to_none=True)
            opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))

        return step

    def diffusion(**options: object) -> Callable:
        return attached(lambda m: DiffusionMetricSGD(m, lr=1e-4, momentum=0.9, **options))

    return {
        BASELINE: attached(lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)),
        "default, weak, eps auto": diffusion(eps="auto", mode="weak"),
        "default, exact, eps auto": diffusion(eps="auto", mode="exact"),
        "default, weak, fixed eps": diffusion(eps=1e-3, mode="weak"),
        "unfused, weak, eps auto": diffusion(eps="auto", mode="weak", fused=False),
        "unfused, exact, eps auto": diffusion(eps="auto", mode="exact", fused=False),
        CLOSURE: closure_route,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--cases", nargs="+", default=["mlp", "transformer", "resnet-gn"], metavar="CASE"
    )
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory:
        model, x, y = make_case(args.memory[0], device)
        before = resident_mib()
        routes(model, x, y)[args.memory[1]]()()
        report_peak_rss(before)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.cases:
        model, x, y = make_case(name, device)
        setups = routes(model, x, y)
        memory = route_memory(__file__, name, setups, device)
        # the closure route (seconds a step, GBs of rows) is timed on its own: taking turns
        # with it slowed the baseline of the fast routes (26 -> 39 ms on the transformer)
        fast = {route: setup() for route, setup in setups.items() if route != CLOSURE}
        seconds = interleaved_times(fast, device, args.repeats)
        seconds[CLOSURE] = median_time(setups[CLOSURE](), device, repeats=3, warmup=1)
        d = sum(p.numel() for p in model.parameters())
        print_table(
            f"{name}: d = {d:,}, B = {len(x)}, {device}",
            [(route, seconds[route], memory[route]) for route in setups],
            BASELINE,
        )


if __name__ == "__main__":
    main()
