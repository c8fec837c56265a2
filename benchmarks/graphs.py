"""Benchmark whole training steps captured as CUDA graphs (CUDA only).

Run: ``python benchmarks/graphs.py [--cases mlp:64 mlp mlp:1024 transformer]``.

On a fast GPU a small model's step is bound by its launches and the Python that issues
them, not by arithmetic: the hooks, the captures and the sample-space work of
:class:`~sgdgeom.optim.DiffusionMetricSGD` add launches a plain step does not make. A
CUDA graph replays the whole step (forward, backward, ``opt.step()``) as one launch, so
the ratios approach the arithmetic floors. Each step here is captured after warm-up steps
on a side stream, as PyTorch's CUDA-graph recipe says, and replayed on one fixed batch:

- ``SGD step, CUDA graph`` (the baseline) and ``SGD step, eager``;
- ``metric weak / exact, eps auto, CUDA graph``: ``DiffusionMetricSGD(..., capturable=True)``;
- ``metric weak, fixed eps, CUDA graph``;
- ``metric weak, eps auto, eager``: the uncaptured default, for scale.

First, a check: on a float64 MLP, three replays on fresh batches (copied into the captured
input) equal three eager steps of the device route from the same state.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, make_case, print_table, training_step
from optim import floors

from sgdgeom.optim import DiffusionMetricSGD


def eager_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    return training_step(opt, lambda: nn.functional.cross_entropy(model(x), y))


def captured_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """Three eager steps on a side stream (the metric's first is its checked, unfused
    step), then the capture of one whole step; returns the replay."""
    step = eager_step(model, x, y, opt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return graph.replay


def check(device: torch.device) -> None:
    """Replays on fresh batches equal the eager device route, step for step."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)).double().to(device)
    x = torch.randn(64, 20, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (64,), device=device)
    for mode in ("weak", "exact"):
        eager, graphed = copy.deepcopy(template), copy.deepcopy(template)
        options = {"lr": 0.1, "momentum": 0.9, "mode": mode}
        eager_opt = DiffusionMetricSGD(eager, sync="device", **options)
        graphed_opt = DiffusionMetricSGD(graphed, capturable=True, **options)
        x_static, y_static = x.clone(), y.clone()
        replay = captured_step(graphed, x_static, y_static, graphed_opt)
        for _ in range(3):  # the warm-up steps, eagerly
            eager_step(eager, x, y, eager_opt)()
        error = 0.0
        for _ in range(3):
            batch = torch.randn_like(x), torch.randint(0, 5, (64,), device=device)
            eager_step(eager, *batch, eager_opt)()
            x_static.copy_(batch[0])
            y_static.copy_(batch[1])
            replay()
            for p, q in zip(eager.parameters(), graphed.parameters(), strict=True):
                error = max(error, float((p - q).abs().max()))
        print(f"check, {mode}: 3 replays against 3 eager steps, max |difference| {error:.1e}")


def routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    def build(make: Callable[[nn.Module], torch.optim.Optimizer], graph: bool) -> Callable:
        twin = copy.deepcopy(model)
        return (captured_step if graph else eager_step)(twin, x, y, make(twin))

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

    def metric(**options: object) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: DiffusionMetricSGD(m, lr=1e-4, momentum=0.9, **options)

    return {
        "SGD step, CUDA graph (baseline)": build(sgd, True),
        "SGD step, eager": build(sgd, False),
        "metric weak, eps auto, graph": build(metric(capturable=True), True),
        "metric exact, eps auto, graph": build(metric(inverse="exact", capturable=True), True),
        "metric weak, fixed eps, graph": build(metric(eps=1e-3, capturable=True), True),
        "metric weak, eps auto, eager": build(metric(), False),
    }


FLOORS = {  # the floors of benchmarks/optim.py that each route shares
    "metric weak, eps auto, graph": "default, weak, eps auto",
    "metric exact, eps auto, graph": "default, exact, eps auto",
    "metric weak, fixed eps, graph": "default, weak, fixed eps",
    "metric weak, eps auto, eager": "default, weak, eps auto",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cases", nargs="+", default=["mlp:64", "mlp", "mlp:1024"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("CUDA graphs need a CUDA device")
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    check(device)
    for name in args.cases:
        model, x, y = make_case(name, device)
        try:
            steps = routes(model, x, y)
        except RuntimeError as err:  # a model whose step cannot be captured: say why
            print(f"\n{name}: not captured: {err}")
            continue
        seconds = interleaved_times(steps, device, args.repeats)
        bounds = floors(model, x, y)  # memory is not measured here: nan
        print_table(
            f"{name}: B = {len(x)}, {device}, whole steps",
            [(route, time, (math.nan, math.nan)) for route, time in seconds.items()],
            "SGD step, CUDA graph (baseline)",
            {route: bounds[key] for route, key in FLOORS.items()}
            | {"SGD step, eager": 1.0, "SGD step, CUDA graph (baseline)": 1.0},
        )


if __name__ == "__main__":
    main()
