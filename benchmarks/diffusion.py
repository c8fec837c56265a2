"""Benchmark the diffusion matrix: D·v by every route, and the full spectrum.

Run: ``python benchmarks/diffusion.py [--device cuda] [--skip-spectrum] [--cases mlp:64 ...]``.

Cases: Musso's 784-784-784-10 MLP at B=64 (a fresh small batch: fixed costs show) and
B=256 on MNIST-5k digits; the CIFAR-10 CNN (Musso
eq. 24) at B=64 on random 32x32 images; a 2-block pre-LayerNorm transformer (dim 64, 4 heads)
reading MNIST-5k digits as 28 tokens of 28 pixels at B=64; a ResNet with GroupNorm
(16 channels, 2 blocks) on random 32x32 images at B=64. Routes, each against a plain
forward+backward of the mean loss measured in the same run:

- ``D·v capture (cached)``: the layer rules on cached layer inputs and output gradients
  (the module-local torch.func fallback for attention): no pass over the model;
- ``D·v incl. capture``: the same, building D each time: the coverage check on 8 samples,
  then the one forward+backward that captures the layers;
- ``D·v generic (JVP+VJP)``: torch.func forward-mode then reverse-mode product;
- ``D·v vmap per-sample``: materialise G (B x d) with ``vmap(grad)``, then ``G_cᵀ G_c v / B``;
- ``D·v BackPACK BatchGrad``: if ``backpack`` is importable.

The ``floor`` column: the capture routes' arithmetic floors (:func:`floors`).

Then the whole nonzero spectrum of D on all 5,000 MNIST-5k digits (d = 1,238,730): the
capture, the 5000 x 5000 Gram matrix and its eigenvalues, timed against one
forward+backward over the same 5,000 samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

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

from sgdgeom.data import load_dataset
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.models import build_model
from sgdgeom.persample.func import reference_kernels


def vmap_matvec(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with reference_kernels():  # the fused attention kernel has no vmap batching rule
            grads = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
        G = torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1)
        G = G - G.mean(0)
        return G.T @ (G @ v) / len(x)

    return matvec


def backpack_matvec(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        return None
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def matvec(v: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        with backpack(BatchGrad()):
            loss_fn(model(x), y).backward()
        G = torch.cat([p.grad_batch.reshape(len(x), -1) for p in model.parameters()], 1)
        G = G - G.mean(0)
        return G.T @ (G @ v) / len(x)

    return matvec


def routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    """Each route as a setup function returning the step to measure."""
    d = sum(p.numel() for p in model.parameters())
    v = torch.randn(d, device=x.device)

    def baseline():
        def step():
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        return step

    def capture_cached():
        D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
        return lambda: D @ v

    def with_capture():
        return lambda: DiffusionMatrix(model, "cross_entropy", (x, y), route="capture") @ v

    def generic():
        D = DiffusionMatrix(model, "cross_entropy", (x, y), route="generic")
        return lambda: D @ v

    def vmapped():
        matvec = vmap_matvec(model, x, y)
        return lambda: matvec(v)

    out = {
        "forward+backward (baseline)": baseline,
        "D·v capture (cached)": capture_cached,
        "D·v incl. capture": with_capture,
        "D·v generic (JVP+VJP)": generic,
        "D·v vmap per-sample": vmapped,
    }
    if backpack_matvec(model, x, y) is not None:
        out["D·v BackPACK BatchGrad"] = lambda: (lambda m: lambda: m(v))(
            backpack_matvec(model, x, y)
        )
    return out


def run_case(name: str, device: torch.device, repeats: int) -> None:
    model, x, y = make_case(name, device)
    setups = routes(model, x, y)
    memory = route_memory(__file__, name, setups, device)
    seconds = interleaved_times(
        {route: setup() for route, setup in setups.items()}, device, repeats
    )
    d = sum(p.numel() for p in model.parameters())
    rows = [(route, seconds[route], memory[route]) for route in setups]
    print_table(
        f"{name}: d = {d:,}, B = {len(x)}, {device}",
        rows,
        "forward+backward (baseline)",
        floors(model, x, y),
    )


def floors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The capture routes' arithmetic floors over a forward+backward's multiply-adds
    (``product_costs``: forward, input and weight gradients): ``G v`` and ``Gᵀ w`` at the
    captures' cost ``P`` each (``CaptureProducts.costs``), plus, when D is built, the
    capture's forward and input gradients (no weight gradients)."""
    calls = product_costs(model, x)
    forward = sum(cost for _, cost, _ in calls)
    inputs = sum(cost for _, cost, grad_in in calls if grad_in)
    plain = 2 * forward + inputs
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    product = D.products.costs()[0]
    return {
        "forward+backward (baseline)": 1.0,
        "D·v capture (cached)": 2 * product / plain,
        "D·v incl. capture": (forward + inputs + 2 * product) / plain,
    }


def run_spectrum(device: torch.device) -> None:
    ds = load_dataset("mnist5k")
    x = ds.normalize(torch.cat([ds.x_train, ds.x_test])).to(device)
    y = torch.cat([ds.y_train, ds.y_test]).to(device)
    torch.manual_seed(0)
    model = build_model("fc", ds.input_shape, 10, depth=2).to(device)

    def full_pass():
        model.zero_grad(set_to_none=True)
        for start in range(0, len(x), 1024):
            nn.functional.cross_entropy(
                model(x[start : start + 1024]), y[start : start + 1024]
            ).backward()

    base = median_time(full_pass, device, repeats=3, warmup=1)
    for dtype in (torch.float32, torch.float64):
        m, xx = model.to(dtype), x.to(dtype)
        start = time.perf_counter()
        D = DiffusionMatrix(m, "cross_entropy", (xx, y), chunk_size=1024)
        captured = time.perf_counter()
        D.gram()
        gram = time.perf_counter()
        values = D.eigvalsh()
        done = time.perf_counter()
        print(
            f"\nfull spectrum, N = {D.n:,}, d = {D.space.dim:,}, {dtype}, {device}: "
            f"{done - start:.2f} s = {(done - start) / base:.1f} x one forward+backward over "
            f"the N samples ({base:.3f} s)"
        )
        print(
            f"  capture {captured - start:.2f} s, Gram {gram - captured:.2f} s, eigenvalues "
            f"{done - gram:.2f} s; rank {D.rank()} (bound {D.n - 1}), "
            f"λ_max {float(values[0]):.4g}, trace {D.trace():.4g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-spectrum", action="store_true")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["mlp:64", "mlp", "cnn", "transformer", "resnet-gn"],
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
        run_case(name, device, args.repeats)
    if not args.skip_spectrum:
        run_spectrum(device)


if __name__ == "__main__":
    main()
