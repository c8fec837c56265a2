"""sgdgeom beside the peer libraries, in one process: per-sample squared gradient norms
(``tr D``'s ingredients) against Opacus' ghost norms and BackPACK's ``BatchL2Grad``, and the
Hessian's top eigenpairs against curvlinops.

    python benchmarks/peers.py [--cases cnn mlp] [--repeats 10] [--hessian-k 4]

Every time is a ratio to a plain forward+backward of the same batch measured in the same run
(the routes take turns, so load on the machine touches them alike). A peer that is not
installed is skipped (``pip install opacus backpack-for-pytorch curvlinops-for-pytorch``;
they pin their own torch ranges, so install them with ``--no-deps`` beside a CPU build).
Each route's norms are checked against ours before timing (largest relative difference).

- ``sq norms sgdgeom``: ``DiffusionMatrix(..., route="capture").sample_sq_norms()``, one
  capture pass (forward, backward with hooks) and the layer rules' norms;
- ``sq norms Opacus ghost``: ``GradSampleModuleFastGradientClipping`` with ghost clipping,
  one forward+backward, then ``get_norm_sample()``;
- ``sq norms BackPACK``: one backward under ``BatchL2Grad``, summed over the parameters.

The Hessian part counts what each route costs per Hessian-vector product when both find the
top ``k`` eigenpairs of the mean loss's Hessian over the same batch (``HessianOperator.eigsh``
against curvlinops' ``HessianLinearOperator`` with scipy's ``eigsh``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, make_case, median_time

from sgdgeom import DiffusionMatrix
from sgdgeom.hessian import HessianOperator


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: DiffusionMatrix(
        model, "cross_entropy", (x, y), route="capture"
    ).sample_sq_norms()


def opacus_ghost(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor] | None:
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
    except ImportError:
        return None
    wrapped = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean"
    )

    def norms() -> torch.Tensor:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y).backward()
        return wrapped.get_norm_sample().square()

    return norms


def backpack_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor] | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except ImportError:
        return None
    extended = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())

    def norms() -> torch.Tensor:
        extended.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss_fn(extended(x), y).backward()
        return sum(p.batch_l2 for p in extended.parameters())  # type: ignore[return-value]

    return norms


def sq_norm_routes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Callable[[], object]]:
    def baseline() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    routes: dict[str, Callable[[], object]] = {"forward+backward (baseline)": baseline}
    routes["sq norms sgdgeom"] = ours(model, x, y)
    reference = routes["sq norms sgdgeom"]()
    assert isinstance(reference, torch.Tensor)
    for name, make in (("sq norms Opacus ghost", opacus_ghost), ("sq norms BackPACK", backpack_l2)):
        route = make(model, x, y)
        if route is None:
            print(f"  ({name}: not installed)")
            continue
        # BackPACK's are the mean loss's per-sample gradients, g_i / B; Opacus rescales
        # (loss_reduction="mean") to sgdgeom's g_i
        scale = float(len(x)) ** 2 if "BackPACK" in name else 1.0
        got = route() * scale
        gap = float(((got - reference).abs() / reference.abs().clamp_min(1e-30)).max())
        print(f"  {name}: largest relative difference from sgdgeom {gap:.1e}")
        routes[name] = route
    return routes


def run_sq_norms(case: str, repeats: int) -> None:
    model, x, y = make_case(case, torch.device("cpu"))
    d = sum(p.numel() for p in model.parameters())
    print(f"\n{case}: d = {d:,}, B = {len(x)}")
    seconds = interleaved_times(sq_norm_routes(model, x, y), torch.device("cpu"), repeats)
    base = seconds["forward+backward (baseline)"]
    for route, value in seconds.items():
        print(f"  {route:<30} {value * 1e3:9.1f} ms  {value / base:6.2f}x")


class Counting(nn.Module):
    """The model, counting its forward calls (a Hessian-vector product's passes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def run_hessian(case: str, k: int) -> None:
    """Each route's time in forward+backward passes (FB) of the same batch, its forwards,
    and FB per Hessian-vector product (a vmapped block of m vectors is one forward)."""
    model, x, y = make_case(case, torch.device("cpu"))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    fb = median_time(forward_backward, torch.device("cpu"), repeats=10)
    print(f"\n{case}: top {k} Hessian eigenpairs over B = {len(x)}; one FB = {fb * 1e3:.1f} ms")
    counted = Counting(model)
    start = time.perf_counter()
    pairs = HessianOperator(counted, "cross_entropy", (x, y)).eigsh(k)
    ours_s = time.perf_counter() - start
    print(
        f"  sgdgeom HessianOperator.eigsh ({pairs.method}): {ours_s:6.2f} s = "
        f"{ours_s / fb:5.0f} FB, {pairs.products} products ({ours_s / fb / pairs.products:.1f} "
        f"FB each), {counted.calls} forwards, "
        f"λ = {np.array2string(pairs.values.numpy(), precision=4)}"
    )
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh
    except ImportError:
        print("  (curvlinops: not installed)")
        return
    counted.calls = 0
    params = [p for p in counted.parameters() if p.requires_grad]
    start = time.perf_counter()
    H = HessianLinearOperator(counted, nn.CrossEntropyLoss(), params, [(x, y)]).to_scipy()
    theirs = eigsh(H, k=k, which="LA")[0][::-1]
    theirs_s = time.perf_counter() - start
    print(
        f"  curvlinops + scipy eigsh: {theirs_s:6.2f} s = {theirs_s / fb:5.0f} FB, "
        f"{counted.calls} products ({theirs_s / fb / counted.calls:.1f} FB each), "
        f"λ = {np.array2string(theirs, precision=4)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["cnn", "mlp"], metavar="CASE")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hessian-k", type=int, default=4)
    parser.add_argument("--hessian-case", default="mlp:256")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for case in args.cases:
        run_sq_norms(case, args.repeats)
    if args.hessian_k:
        run_hessian(args.hessian_case, args.hessian_k)


if __name__ == "__main__":
    main()
