"""Benchmark DiffusionMetricSGD against a plain SGD step, in one run.

Run: ``python benchmarks/optim.py [--device cuda]``.

Musso's 784-784-784-10 MLP on MNIST-5k digits at B = 256 (issue 4). Every route is a
whole training step (zero_grad, forward, backward, optimizer step); the baseline is
``torch.optim.SGD`` with momentum. Routes:

- weak, fixed ε: ``(I − εD) ḡ`` with ε checked against ``tr D`` (no Gram matrix);
- weak, ε = auto: ε = 0.5/λ_max of the batch, so the B x B Gram matrix every step;
- exact, ε = auto: ``(I + εD)⁻¹ ḡ`` by Woodbury through the Gram matrix;
- fused (the same three): the metric gradient is computed in place of the Linear layers'
  weight gradients, which the backward then skips;
- closure route, weak: the generic route for any model, which materialises the per-sample
  gradients (B x d) with one batched backward.
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
    peak_memory,
    peak_rss_in_child,
    print_table,
    report_peak_rss,
    resident_mib,
)

from sgdgeom.data import load_dataset
from sgdgeom.models import build_model
from sgdgeom.optim import DiffusionMetricSGD

BASELINE = "SGD step (baseline)"


def make_case(device: torch.device):
    torch.manual_seed(0)
    ds = load_dataset("mnist5k")
    x, y = ds.normalize(ds.x_train[:256]).to(device), ds.y_train[:256].to(device)
    model = build_model("fc", ds.input_shape, 10, depth=2).to(device)
    return model, x, y


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

    return {
        BASELINE: attached(lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)),
        "diffusion weak, fixed eps": attached(
            lambda m: DiffusionMetricSGD(m, lr=1e-4, momentum=0.9, eps=1e-3, mode="weak")
        ),
        "diffusion weak, eps auto": attached(
            lambda m: DiffusionMetricSGD(m, lr=1e-4, momentum=0.9, eps="auto", mode="weak")
        ),
        "diffusion exact, eps auto": attached(
            lambda m: DiffusionMetricSGD(m, lr=1e-4, momentum=0.9, eps="auto", mode="exact")
        ),
        "fused weak, fixed eps": attached(
            lambda m: DiffusionMetricSGD(
                m, lr=1e-4, momentum=0.9, eps=1e-3, mode="weak", fused=True
            )
        ),
        "fused weak, eps auto": attached(
            lambda m: DiffusionMetricSGD(
                m, lr=1e-4, momentum=0.9, eps="auto", mode="weak", fused=True
            )
        ),
        "fused exact, eps auto": attached(
            lambda m: DiffusionMetricSGD(
                m, lr=1e-4, momentum=0.9, eps="auto", mode="exact", fused=True
            )
        ),
        "closure route, weak, eps auto": closure_route,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory", metavar="ROUTE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory:
        model, x, y = make_case(device)
        before = resident_mib()
        routes(model, x, y)[args.memory]()()
        report_peak_rss(before)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, x, y = make_case(device)
    setups = routes(model, x, y)
    if device.type == "cuda":
        memory = {route: peak_memory(setup, device) for route, setup in setups.items()}
    else:
        memory = {route: peak_rss_in_child(__file__, route) for route in setups}
    seconds = interleaved_times(
        {route: setup() for route, setup in setups.items()}, device, args.repeats
    )
    d = sum(p.numel() for p in model.parameters())
    print_table(
        f"784-784-784-10 MLP: d = {d:,}, B = {len(x)}, {device}",
        [(route, seconds[route], memory[route]) for route in setups],
        BASELINE,
    )


if __name__ == "__main__":
    main()
