"""Benchmark partial local entropy routes against a plain step, in one run.

Run: ``python benchmarks/local_entropy.py [--device cuda]``.

Each route is a whole step (zero_grad, the loss, backward, SGD step) with PLA, y = 4:

- ``naive``: y+1 forward passes of the whole model;
- ``prefix``: the layers before the first smoothed one run once, the branches as one
  batch of (y+1) B rows;
- ``split``: each of the y+1 chunks of the batch sees its own perturbation (about one step);
- ``draw ... only``: drawing the y uniform perturbations alone (the counter-based source of
  :mod:`sgdgeom.optim.perturbations`), which every route pays on top of its products;
- on an accelerator, ``prefix compiled`` and ``split compiled``: the same with
  ``compile=True`` (the draw through ``torch.compile``).

Beside each route, its **arithmetic floor**: the multiply-adds of its matrix products
(Linear and Conv2d layers, forward, input gradient where one is needed, weight gradient)
over those of the plain step. Prefix: the layers before the first smoothed one as in a
plain step; the branch point y+1 forward and input-gradient products and one weight
gradient; every later layer on (y+1) B rows. Naive: y+1 plain steps. Split: one plain step.

Models: Musso's 784-784-784-10 MLP on MNIST-5k digits at B = 256, smoothing fc1, fc2 and
both; Musso's CIFAR-10 CNN (eq. 24) at B = 64 on random images, smoothing its first FC
layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, product_costs, training_step

from sgdgeom.data import load_dataset
from sgdgeom.models import build_model
from sgdgeom.optim.local_entropy import PartialLocalEntropy


def step_of(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return training_step(torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9), loss_fn)


def floors(model: nn.Module, x: torch.Tensor, layers: list[str], y: int) -> dict[str, float]:
    """Each route's arithmetic floor, relative to a plain step (module docstring)."""
    calls = product_costs(model, x)
    plain = sum(cost * (2 + grad_in) for _, cost, grad_in in calls)
    branch = next(i for i, (name, _, _) in enumerate(calls) if name in layers)
    prefix = sum(cost * (2 + grad_in) for _, cost, grad_in in calls[:branch])
    _, cost, grad_in = calls[branch]
    prefix += cost * ((y + 1) * (1 + grad_in) + 1)
    prefix += sum(cost * (y + 1) * (2 + grad_in) for _, cost, grad_in in calls[branch + 1 :])
    return {"naive": float(y + 1), "prefix": prefix / plain, "split": 1.0}


def run(
    title: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    selections: list[list[str]],
    device: torch.device,
    repeats: int,
) -> None:
    steps = {
        "plain step (baseline)": step_of(model, lambda: nn.functional.cross_entropy(model(x), y))
    }
    floor = {"plain step (baseline)": 1.0}
    for layers in selections:
        route_floors = floors(model, x, layers, 4)
        variants = [(route, False) for route in ("naive", "prefix", "split")]
        if device.type != "cpu":  # the draw compiled: one kernel a layer
            variants += [("prefix", True), ("split", True)]
        for route, compiled in variants:
            ple = PartialLocalEntropy(
                model, layers=layers, R=0.01, y=4, batching=route, compile=compiled
            )
            name = f"PLA y=4 {'+'.join(layers)} {route}{' compiled' * compiled}"
            steps[name] = step_of(model, lambda ple=ple: ple(x, y))
            floor[name] = route_floors[route]
        # what every route pays besides its products: drawing the y perturbations
        steps[f"draw y=4 {'+'.join(layers)} only"] = ple.sample
    times = interleaved_times(steps, device, repeats)
    base = times["plain step (baseline)"]
    print(f"\n{title}, {device}")
    print(f"{'step':<40} {'time':>11} {'x base':>7} {'floor':>7}")
    for name, seconds in times.items():
        bound = f"{floor[name]:>7.2f}" if name in floor else f"{'':>7}"
        print(f"{name:<40} {seconds * 1e3:>9.2f}ms {seconds / base:>7.2f} {bound}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    ds = load_dataset("mnist5k")
    x, y = ds.normalize(ds.x_train[:256]).to(device), ds.y_train[:256].to(device)
    mlp = build_model("fc", ds.input_shape, 10, depth=2).to(device)
    run(
        "784-784-784-10 MLP, B = 256",
        mlp,
        x,
        y,
        [["fc1"], ["fc2"], ["fc1", "fc2"]],
        device,
        args.repeats,
    )
    cnn = build_model("cnn-cifar10", (3, 32, 32), 10, init="kaiming").to(device)
    xc, yc = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    run("CIFAR-10 CNN (Musso 24), B = 64", cnn, xc, yc, [["fc1"]], device, args.repeats)


if __name__ == "__main__":
    main()
