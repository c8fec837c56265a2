"""Benchmark D's top-k at data-set scale, and the full spectrum at large N.

Run: ``python benchmarks/spectrum_scale.py [--n 60000] [--k 20] [--device cuda]
[--methods block-lanczos:10,lanczos] [--full-n 20000]``.

1. Top-k of D for Musso's 784-784-784-10 MLP (d = 1,238,730) over N samples: MNIST-5k
   digits repeated with random shifts of up to 2 pixels and Gaussian pixel noise, to
   N = 60,000 by default. The baseline is one forward+backward of the mean loss over the
   same N samples (batches of 1,024), measured in this run; each method's time is given
   in those forward+backward-equivalents, beside its passes over the data and its vector
   products. The arithmetic floor: a product with D is one JVP (a forward's matmuls) and one
   VJP (a weight gradient's) on the captured layers, 2/3 of a forward+backward, so k
   verified eigenpairs cost at least ``(2/3)·k`` forward+backward-equivalents after the
   capture, whatever the method.
2. The full spectrum (``eigvalsh`` of the N x N Gram matrix) at ``--full-n`` samples on a
   784-64-10 MLP: it completes, or it is refused before anything is allocated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import sync

from sgdgeom.data import load_dataset
from sgdgeom.diffusion import DiffusionMatrix, gram_spectrum_bytes
from sgdgeom.errors import InputError
from sgdgeom.models import build_model
from sgdgeom.persample.storage import available_bytes


def augmented_mnist(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MNIST-5k digits, normalised, repeated with shifts and noise."""
    data = load_dataset("mnist5k")
    x0, y0 = data.normalize(data.x_train).float(), data.y_train
    g = torch.Generator().manual_seed(seed)
    parts, labels, done = [], [], 0
    while done < n:
        take = min(len(x0), n - done)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        shifted = torch.roll(x0[:take], shifts=(dy, dx), dims=(-2, -1))
        parts.append(shifted + 0.1 * torch.randn(shifted.shape, generator=g) * (done > 0))
        labels.append(y0[:take])
        done += take
    return torch.cat(parts), torch.cat(labels)


def forward_backward_time(model: nn.Module, x, y, device) -> float:
    """Seconds of one forward+backward of the mean loss over all of ``x`` (batches of 1,024)."""
    best = float("inf")
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(x), 1024):
            loss = nn.functional.cross_entropy(model(x[i : i + 1024]), y[i : i + 1024])
            loss.backward()
        sync(device)
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def top_k(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), 10).to(device).eval()
    x, y = augmented_mnist(args.n)
    x, y = x.to(device), y.to(device)
    base = forward_backward_time(model, x, y, device)
    start = time.perf_counter()
    D = DiffusionMatrix(model, "cross_entropy", (x, y), chunk_size=1024, progress=True)
    sync(device)
    capture = time.perf_counter() - start
    print(
        f"N = {D.n:,}, d = {D.space.dim:,}, float32 on {device}; one forward+backward over "
        f"the data: {base:.2f} s; capture (captures kept in {D.products.storage}): "
        f"{capture:.2f} s = {capture / base:.2f} FB"
    )
    rows, reference = [], None
    for spec in args.methods.split(","):
        method, _, block = spec.partition(":")  # "block-lanczos:10": 10 vectors a pass
        start = time.perf_counter()
        pairs = D.eigsh(
            args.k,
            method,
            tol=args.tol,
            oversample=args.oversample,
            block=int(block) if block else None,
            progress=True,
        )
        sync(device)
        seconds = time.perf_counter() - start
        reference = pairs.values if reference is None else reference
        agree = float(((pairs.values - reference).abs() / reference.abs()).max())
        rows.append(
            [
                spec,
                f"{seconds:.1f}",
                f"{seconds / base:.1f}",
                str(pairs.passes),
                str(pairs.products),
                f"{2 * pairs.products / 3:.0f}",
                f"{float(pairs.residuals.max() / pairs.values[0]):.1e}",
                f"{agree:.1e}",
                str(pairs.converged),
            ]
        )
    header = ["method", "seconds", "FB-equiv.", "passes", "products", "floor FB"]
    header += ["max res/λ1", "vs first", "converged"]
    print(f"\ntop-{args.k} of D, tol {args.tol:g} · λ_1 (floor FB: (2/3) · products)")
    for row in [header, *rows]:
        print("".join(f"{cell:>14}" for cell in row))


def full_spectrum(n: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, widths=(64,)).to(device).eval()
    x, y = augmented_mnist(n, seed=1)
    x, y = x.to(device), y.to(device)
    needed, free = gram_spectrum_bytes(n, torch.float32, device), available_bytes(device)
    print(
        f"\nfull spectrum, N = {n:,} (784-64-10 MLP, float32): needs {needed / 2**30:.1f} GiB, "
        f"{'unknown' if free is None else f'{free / 2**30:.1f} GiB'} free"
    )
    start = time.perf_counter()
    D = DiffusionMatrix(model, "cross_entropy", (x, y), chunk_size=2048)
    try:
        gram_start = time.perf_counter()
        D.gram()
        sync(device)
        eig_start = time.perf_counter()
        values = D.eigvalsh()
        sync(device)
    except InputError as err:
        print(f"refused up front after {time.perf_counter() - start:.1f} s: {err}")
        return
    print(
        f"completed: capture {gram_start - start:.1f} s, Gram matrix {eig_start - gram_start:.1f} "
        f"s, eigvalsh {time.perf_counter() - eig_start:.1f} s; λ_max {float(values[0]):.4g}, "
        f"rank {D.rank():,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument(
        "--methods",
        default="block-lanczos:10,block-lanczos,lanczos,randomized",
        help="comma-separated; METHOD:B passes B vectors at a time",
    )
    parser.add_argument("--full-n", type=int, default=20_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-top-k", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.skip_top_k:
        top_k(args, device)
    if args.full_n:
        full_spectrum(args.full_n, device)


if __name__ == "__main__":
    main()
