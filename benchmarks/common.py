"""Timing and peak-memory helpers shared by the benchmarks.

Every figure a benchmark prints is a ratio against a baseline measured in the same process
and run. Time is the median of ``repeats`` calls after ``warmup`` calls. Peak memory:

- on CUDA, ``torch.cuda.max_memory_allocated`` during the call, above what was allocated
  before it, plus that resident amount (model, data, caches made before timing);
- on the CPU, each measurement runs in a fresh interpreter and reports its peak resident
  set size (``VmHWM``), which includes the interpreter, torch, model and data that
  every route shares.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgdgeom.data import load_dataset
from sgdgeom.models import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any], device: torch.device, repeats: int = 10, warmup: int = 2
) -> float:
    """Median seconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    steps: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns in every round, so that a slow
    drift of the machine (clock, caches, other load) touches every route alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(
    setup: Callable[[], Callable[[], Any]], device: torch.device
) -> tuple[float, float]:
    """CUDA only: (peak MiB allocated while building ``setup()`` and running one step, and
    that peak above what was allocated before)."""
    gc.collect()  # earlier routes' models may sit in reference cycles (hooks <-> optimizer)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = setup()
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def peak_rss_in_child(script: str, *args: str) -> tuple[float, float]:
    """CPU: run ``script --memory ARGS`` in a fresh interpreter; it builds the model and
    data, notes its resident set, builds the route and runs one step, and prints the
    high-water mark of its resident set. Returns (peak MiB, peak above the noted MiB)."""
    proc = subprocess.run(
        [sys.executable, script, "--memory", *args], capture_output=True, text=True, check=True
    )
    before, peak = map(float, proc.stdout.strip().splitlines()[-1].split())
    return peak, peak - before


def route_memory(
    script: str, case: str, setups: dict[str, Callable[[], Any]], device: torch.device
) -> dict[str, tuple[float, float]]:
    """Each route's (peak MiB, step MiB): in this process on CUDA, else in a fresh child
    process per route (``script --memory CASE ROUTE``)."""
    if device.type == "cuda":
        return {route: peak_memory(setup, device) for route, setup in setups.items()}
    return {route: peak_rss_in_child(script, case, route) for route in setups}


def _status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def resident_mib() -> float:
    """The child's resident set now, MiB (Linux)."""
    return _status_mib("VmRSS")


def report_peak_rss(before: float) -> None:
    """The child's side of :func:`peak_rss_in_child`: ``before`` and the high-water mark of
    its resident set (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across fork and
    exec)."""
    print(before, _status_mib("VmHWM"))


def print_table(
    title: str,
    rows: list[tuple[str, float, tuple[float, float]]],
    baseline: str,
    floors: dict[str, float] | None = None,
) -> None:
    """Rows of (route, seconds, (peak MiB, step MiB)), with ratios against the baseline row.
    ``peak`` counts everything resident; ``step`` only what the route added to the model
    and data already there. ``floors``: each route's arithmetic floor (x base), a column."""
    base_t, (base_m, base_s) = next((t, m) for name, t, m in rows if name == baseline)
    floors = floors or {}
    print(f"\n{title}")
    print(
        f"{'route':<32} {'time':>10} {'x base':>7} {'floor':>6} {'peak MiB':>9} {'x base':>7} "
        f"{'step MiB':>9} {'x base':>7}"
    )
    for name, seconds, (mib, step) in rows:
        floor = f"{floors[name]:>6.2f}" if name in floors else f"{'':>6}"
        print(
            f"{name:<32} {seconds * 1e3:>8.2f}ms {seconds / base_t:>7.2f} {floor} {mib:>9.1f} "
            f"{mib / base_m:>7.2f} {step:>9.1f} {step / max(base_s, 1e-9):>7.2f}"
        )


def product_costs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, float, bool]]:
    """``(module name, multiply-adds of one product, whether its input needs a gradient)``
    of every Linear and Conv2d, in the order the forward calls them: every layer's input
    but the first one's (the data) needs one."""
    calls: list[tuple[str, float, bool]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        fan_in = module.weight[0].numel()  # in, or in/groups x kernel
        calls.append((names[module], out.numel() * fan_in, calls != []))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return calls


def training_step(
    opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]
) -> Callable[[], None]:
    """One whole training step: ``zero_grad``, the loss's backward, ``opt.step()``."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step


def make_case(case: str, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The benchmark models and one batch: ``mlp`` (Musso's 784-784-784-10, B = 256 of
    MNIST-5k), ``cnn`` (Musso eq. 24, B = 64 random 32x32 images), ``transformer`` (2 blocks,
    dim 64, MNIST-5k digits as 28 tokens, B = 64) and ``resnet-gn`` (16 channels, 2 blocks,
    B = 64 random 32x32 images); ``name:B`` takes a batch of B instead (``mlp:1024``)."""
    torch.manual_seed(0)
    name, _, size = case.partition(":")
    batch = int(size) if size else (256 if name == "mlp" else 64)
    if name in ("mlp", "transformer"):
        ds = load_dataset("mnist5k")
        x, y = ds.normalize(ds.x_train[:batch]), ds.y_train[:batch]
        if name == "mlp":
            model = build_model("fc", ds.input_shape, 10, depth=2)
        else:
            model = build_model("transformer", ds.input_shape, 10, dim=64, depth=2, heads=4)
    elif name == "resnet-gn":
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        model = build_model("resnet-gn", (3, 32, 32), 10, channels=16, blocks=2)
    else:
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        model = build_model("cnn-cifar10", (3, 32, 32), 10, init="kaiming")
    return model.to(device), x.to(device), y.to(device)
