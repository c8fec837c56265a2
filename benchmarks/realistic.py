"""Speed on realistic models: ResNet-18 (CIFAR layout) and a GPT-style decoder.

Run: ``python benchmarks/realistic.py [--device cuda] [--size small|full] [--models resnet18
gpt] [--autocast bf16] [--routes]``.

Sizes: ``small`` fits 2 CPU cores (ResNet-18 at width 16, B = 32 on 32x32; a GPT of dim 128,
2 blocks, vocabulary 2048, 8 x 128 tokens); ``full`` is the real thing for a GPU (ResNet-18
at width 64, B = 128 on 32x32; GPT-2 small, 124M parameters, 8 x 512 tokens).

Rows, each a whole step (``zero_grad``, forward, backward, ``step``) unless named otherwise,
timed in turns in the same run, with ratios to the plain SGD step (``x SGD``) and to AdamW:

- ``forward+backward``: the mean loss's, no optimizer;
- ``D build + D@v``: capture a fresh D of the batch (one forward and backward to the
  layer outputs), then one product; ``D@v``: one more product on it;
- ``metric weak`` / ``metric exact``: DiffusionMetricSGD (ε auto, fused from the second step);
- ``PLA one layer, auto`` and ``, split``: PartialLocalEntropy, y = 4, on one Linear
  (ResNet's ``out``, GPT's last MLP projection), SGD. ``auto`` takes the prefix batching,
  or the naive one (y + 1 whole passes) where a skip connection goes around the smoothed
  layer, as in every transformer block; ``split`` gives each fifth of the batch its own
  point (about one step's cost, a different variance);
- ``temperature``: SGD plus LayerTemperature's per-step record.

``--routes``: the common models that used to take the slow routes, in float64 as the
issue measured them: a GPT with its head tied to the token embedding (positions indexed
``(B, T)``), the same GPT untied with positions ``torch.arange(T)`` (no batch dimension),
and a net with a depthwise convolution. Building D and one ``D @ v``, and each further
``D @ v``, against one forward+backward. Run it against an older checkout (``PYTHONPATH``)
for the "before" figures.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, training_step

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.models import build_model
from sgdgeom.monitors import LayerTemperature
from sgdgeom.optim import DiffusionMetricSGD, PartialLocalEntropy

SIZES = {
    "small": {
        "resnet18": {"width": 16, "batch": 32},
        "gpt": {"dim": 128, "depth": 2, "heads": 4, "vocab": 2048, "batch": 8, "tokens": 128},
    },
    "full": {
        "resnet18": {"width": 64, "batch": 128},
        "gpt": {"dim": 768, "depth": 12, "heads": 12, "vocab": 50257, "batch": 8, "tokens": 512},
    },
}


def make(name: str, size: str, device: torch.device):
    """``(model, x, y, loss, smoothed layer)`` of one benchmark model."""
    torch.manual_seed(0)
    options = dict(SIZES[size][name])
    batch = options.pop("batch")
    if name == "resnet18":
        model = build_model("resnet18-gn", (3, 32, 32), 10, **options)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        layer = "out"
    else:
        vocab, tokens = options.pop("vocab"), options.pop("tokens")
        model = build_model("gpt", (tokens,), vocab, **options)
        ids = torch.randint(0, vocab, (batch, tokens + 1))
        x, y = ids[:, :-1], ids[:, 1:]
        layer = f"blocks.{options['depth'] - 1}.mlp_proj"
    return model.to(device), x.to(device), y.to(device), layer


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def steps(name: str, size: str, device: torch.device, autocast: torch.dtype | None):
    """The rows of the module doc, each a function of no arguments."""
    region = (
        (lambda: torch.autocast(device.type, dtype=autocast))
        if autocast is not None
        else contextlib.nullcontext
    )
    out: dict[str, Callable[[], object]] = {}

    def loss_of(model, x, y):
        def loss() -> torch.Tensor:
            with region():
                return mean_loss(model, x, y)

        return loss

    model, x, y, _ = make(name, size, device)
    out["SGD step"] = training_step(
        torch.optim.SGD(model.parameters(), lr=1e-6), loss_of(model, x, y)
    )
    model, x, y, _ = make(name, size, device)
    out["AdamW step"] = training_step(
        torch.optim.AdamW(model.parameters(), lr=1e-6), loss_of(model, x, y)
    )
    model, x, y, _ = make(name, size, device)

    def forward_backward(model=model, x=x, y=y) -> None:
        model.zero_grad(set_to_none=True)
        loss_of(model, x, y)().backward()

    out["forward+backward"] = forward_backward
    model, x, y, _ = make(name, size, device)

    def build_and_product(model=model, x=x, y=y) -> None:
        with region():
            D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture", chunk_size=None)
        D @ torch.ones(D.space.dim, device=device, dtype=D.space.dtype)

    out["D build + D@v"] = build_and_product
    with region():
        D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture", chunk_size=None)
    v = torch.randn(D.space.dim, device=device, dtype=D.space.dtype)
    out["D@v"] = lambda: D @ v
    for inverse in ("weak", "exact"):
        model, x, y, _ = make(name, size, device)
        opt = DiffusionMetricSGD(model, lr=1e-6, inverse=inverse)
        out[f"metric {inverse}"] = training_step(opt, loss_of(model, x, y))
    for batching in ("auto", "split"):  # auto: prefix, or naive around a skip connection
        model, x, y, layer = make(name, size, device)
        pla = PartialLocalEntropy(model, layers=[layer], R=1e-3, y=4, batching=batching)

        def pla_loss(pla=pla, x=x, y=y) -> torch.Tensor:
            with region():
                return pla(x, y)  # the GPT's per-token loss: (B, T, V) logits taken as they are

        sgd = torch.optim.SGD(model.parameters(), lr=1e-6)
        out[f"PLA one layer, {batching}"] = training_step(sgd, pla_loss)
    model, x, y, _ = make(name, size, device)
    monitor = LayerTemperature(model=model)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-6)
    loss = loss_of(model, x, y)

    def monitored(sgd=sgd, loss=loss, monitor=monitor) -> None:
        sgd.zero_grad(set_to_none=True)
        loss().backward()
        monitor.record()
        sgd.step()

    out["temperature"] = monitored
    return out


# ---------------------------------------------------------------------- --routes


class UntiedGPT(nn.Module):
    """The GPT with its own head (untied) and positions ``torch.arange(T)``."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt
        self.gpt.head = nn.Linear(gpt.tok.embedding_dim, gpt.tok.num_embeddings, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt(x)


class BatchedPositionsGPT(nn.Module):
    """The GPT (head tied) with positions indexed ``(B, T)``."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        positions = torch.arange(x.shape[1], device=x.device).expand(len(x), -1)
        return g.head(g.norm(g.blocks(g.tok(x) + g.pos(positions))))


def depthwise_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        nn.ReLU(),
        nn.Conv2d(32, 64, 1),  # pointwise
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def route_cases(device: torch.device):
    torch.manual_seed(0)
    gpt = lambda: build_model("gpt", (64,), 512, dim=64, depth=2, heads=4).double()  # noqa: E731
    ids = torch.randint(0, 512, (16, 65))
    tokens = (ids[:, :-1].to(device), ids[:, 1:].to(device))
    images = (torch.randn(32, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (32,)))
    return {
        "GPT, head tied (positions (B, T))": (BatchedPositionsGPT(gpt()), tokens),
        "GPT, untied, positions arange(T)": (UntiedGPT(gpt()).double(), tokens),
        "depthwise-separable CNN": (depthwise_net().double(), tuple(t.to(device) for t in images)),
    }


def per_token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-sample loss, written by hand as an older release needed it."""
    losses = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
    return losses.view(len(target), -1).mean(1) if target.dim() > 1 else losses


def routes(device: torch.device) -> None:
    print("\nroutes: building D + one D@v, and one more D@v, against a forward+backward (float64)")
    print(f"{'model':<36} {'route':>8} {'build+D@v':>10} {'D@v':>7}")
    for name, (model, (x, y)) in route_cases(device).items():
        model = model.to(device)

        def forward_backward(model=model, x=x, y=y) -> None:
            model.zero_grad(set_to_none=True)
            per_token_loss(model(x), y).mean().backward()

        def build(model=model, x=x, y=y) -> DiffusionMatrix:
            with warnings.catch_warnings():  # the generic route's warning, printed once below
                warnings.simplefilter("ignore")
                return DiffusionMatrix(model, per_token_loss, (x, y), chunk_size=None)

        D = build()
        v = torch.randn(D.space.dim, dtype=D.space.dtype, device=device)
        times = interleaved_times(
            {
                "fb": forward_backward,
                "build": lambda build=build, v=v: build() @ v,
                "product": lambda D=D, v=v: D @ v,
            },
            device,
            repeats=5,
            warmup=1,
        )
        print(
            f"{name:<36} {D.route:>8} {times['build'] / times['fb']:>9.2f}x "
            f"{times['product'] / times['fb']:>6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt"])
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--routes", action="store_true", help="the routes section only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.routes:
        routes(device)
        return
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast or "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name in args.models:
        rows = steps(name, args.size, device, autocast)
        times = interleaved_times(rows, device, repeats=args.repeats, warmup=2)
        sgd, adamw = times["SGD step"], times["AdamW step"]
        precision = f", {args.autocast}" if args.autocast else ""
        print(f"\n{name} ({args.size}{precision}): {SIZES[args.size][name]}")
        print(f"{'step':<22} {'time':>10} {'x SGD':>7} {'x AdamW':>8}")
        for row, seconds in times.items():
            print(
                f"{row:<22} {seconds * 1e3:>8.1f}ms {seconds / sgd:>7.2f} {seconds / adamw:>8.2f}"
            )


if __name__ == "__main__":
    main()
