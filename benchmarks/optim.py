"""Benchmark DiffusionMetricSGD against a plain SGD step, in one run.

Run: ``python benchmarks/optim.py [--device cuda]``.

Cases (``--cases``, see ``common.make_case``): Musso's 784-784-784-10 MLP on MNIST-5k
digits at B = 64, 256 and 1024 (``mlp:64``, ``mlp``, ``mlp:1024``: the cost's growth
with B), the 2-block transformer and the ResNet-GN at B = 64. Every route is a whole
training step (zero_grad, forward, backward, optimizer step); the baseline is
``torch.optim.SGD`` with momentum. Routes:

- default, weak / exact, ε auto: ``DiffusionMetricSGD(model, lr, eps="auto", inverse=…)``
  as constructed by default: fused (the metric gradient in place of the weight
  gradients, which the backward skips), the B x B Gram matrix every step; on an
  accelerator no host read (``λ_max`` bounded on the device), and beside it the
  ``sync="host"`` route (Lanczos on the host) that the CPU takes, and
  ``compile=True`` (the device-side bound as one CUDA graph);
- the same with a fixed ε (weak): matrix-free from B ≈ 784 on the MLP (``c = G ḡ`` by a
  JVP, no Gram matrix) when ε tr D < 1;
- unfused (``fused="off"``), weak / exact: the weight gradients in the backward too;
- closure route, weak: the route for parameters without the model, which materialises
  the per-sample gradients (B x d) with one batched backward (skipped above 2 GiB).

The ``floor`` column is each route's arithmetic floor (:func:`floors`).
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
    product_costs,
    report_peak_rss,
    resident_mib,
    route_memory,
)

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.linalg import bound_squarings
from sgdgeom.optim import DiffusionMetricSGD

BASELINE = "SGD step (baseline)"
CLOSURE = "closure route, weak, eps auto"
CLOSURE_BYTES = 2**31  # the closure route's B x d rows are skipped above this


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

    on_host = {}
    if x.device.type != "cpu":  # the accelerator's default makes no host read: compare
        on_host = {
            "sync=host, weak, eps auto": diffusion(eps="auto", sync="host"),
            "sync=host, exact, eps auto": diffusion(eps="auto", inverse="exact", sync="host"),
            "compile=True, weak, eps auto": diffusion(eps="auto", compile=True),
            "compile=True, exact, eps auto": diffusion(eps="auto", inverse="exact", compile=True),
        }
    return {
        BASELINE: attached(lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)),
        "default, weak, eps auto": diffusion(eps="auto", inverse="weak"),
        "default, exact, eps auto": diffusion(eps="auto", inverse="exact"),
        **on_host,
        "default, weak, fixed eps": diffusion(eps=1e-3, inverse="weak"),
        "unfused, weak, eps auto": diffusion(eps="auto", inverse="weak", fused="off"),
        "unfused, exact, eps auto": diffusion(eps="auto", inverse="exact", fused="off"),
        CLOSURE: closure_route,
    }


def floors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Each route's arithmetic floor over the plain step's: the multiply-adds of their
    matrix products (``product_costs`` over Linear and Conv2d modules; a plain step is
    forward, input and weight gradients). A metric step adds the direction ``Gᵀ v`` (one
    weight-gradient product, ``P``; fused, it replaces the weight gradients) and the Gram
    matrix (``CaptureProducts.costs``, and ``B³/3`` for the Cholesky factorisation, exact);
    the weak step with a fixed ε the cheaper of that and ``c = G ḡ`` by products (``2P``
    fused), as DiffusionMetricSGD chooses; on an accelerator, ε auto's device-side bound
    on ``λ_max`` (``s B³``, :func:`~sgdgeom.diffusion.bound_squarings`). The host's Lanczos
    iteration on the ``B x B`` Gram matrix is not counted, nor are modules other than Linear
    and Conv2d (attention, norms) in the plain step: there the floor understates."""
    calls = product_costs(model, x)
    forward = sum(cost for _, cost, _ in calls)
    inputs = sum(cost for _, cost, grad_in in calls if grad_in)
    plain = 2 * forward + inputs
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    product, gram = D.products.costs()

    on_device = x.device.type != "cpu"

    def floor(fused: bool, exact: bool, fixed: bool = False, squarings: bool = False) -> float:
        base = (forward + inputs if fused else plain) + product
        route = gram + exact * len(x) ** 3 / 3 + squarings * bound_squarings(len(x)) * len(x) ** 3
        if fixed:
            route = min(route, product * (2 if fused else 1))
        return (base + route) / plain

    return {
        BASELINE: 1.0,
        "default, weak, eps auto": floor(True, False, squarings=on_device),
        "default, exact, eps auto": floor(True, True, squarings=on_device),
        "sync=host, weak, eps auto": floor(True, False),
        "sync=host, exact, eps auto": floor(True, True),
        "compile=True, weak, eps auto": floor(True, False, squarings=on_device),
        "compile=True, exact, eps auto": floor(True, True, squarings=on_device),
        "default, weak, fixed eps": floor(True, False, fixed=True),
        "unfused, weak, eps auto": floor(False, False),
        "unfused, exact, eps auto": floor(False, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["mlp:64", "mlp", "mlp:1024", "transformer", "resnet-gn"],
        metavar="CASE",
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
        d = sum(p.numel() for p in model.parameters())
        if len(x) * d * x.element_size() > CLOSURE_BYTES:
            del setups[CLOSURE]  # its B x d rows would not fit
        memory = route_memory(__file__, name, setups, device)
        # the closure route (seconds a step, GBs of rows) is timed on its own: taking turns
        # with it slowed the baseline of the fast routes (26 -> 39 ms on the transformer)
        fast = {route: setup() for route, setup in setups.items() if route != CLOSURE}
        seconds = interleaved_times(fast, device, args.repeats)
        if CLOSURE in setups:
            seconds[CLOSURE] = median_time(setups[CLOSURE](), device, repeats=3, warmup=1)
        print_table(
            f"{name}: d = {d:,}, B = {len(x)}, {device}",
            [(route, seconds[route], memory[route]) for route in setups],
            BASELINE,
            floors(model, x, y),
        )


if __name__ == "__main__":
    main()
