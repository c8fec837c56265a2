"""The papers' architectures, by name, with stable readable layer names.

Configs select layers by name (``fc1``, ``fc2``, ``out``, ``conv1``, ...), so the names are
part of the contract:

- ``fc``: Musso §4 and Fig. 1. ``depth`` hidden Linear layers ``fc1..fcL`` of ``width``
  units (784 = 28² in the paper), then ``out`` with one unit per class.
- ``cnn-cifar10``: Musso eq. (24). Five 3x3 valid convolutions ``conv1..conv5`` (3-64-64,
  max-pool, 64-128-128-128, max-pool), then ``fc1``, ``fc2`` of width 128·4·4 and ``out``.
- ``cnn-stl10``: Musso eq. (25), the same with channels 8-8, 16-16-16 on 96x96 images, so
  the head is 16·20·20 wide.
- ``mlp``: a small MLP of any widths, for tests and quick experiments.
- ``small-cnn``: a two-convolution CNN for tests.
- ``resnet-gn`` / ``resnet-bn``: a small ResNet (stem, ``blocks`` residual blocks of two 3x3
  convolutions, GroupNorm or BatchNorm, average pool, ``out``).
- ``transformer``: a pre-LayerNorm transformer encoder (``nn.TransformerEncoderLayer``,
  GELU, no dropout) over token ids (``vocab`` given, Embedding) or rows of features
  (a ``(T, F)`` sample, or an image's rows as T = H tokens of C·W features); learned
  positions, mean pooling, ``out``.
- ``resnet18-gn`` / ``resnet18-bn``: ResNet-18 in its CIFAR layout (He et al. 2016: a 3x3
  stem, no max-pool, four stages of two basic blocks, 64-128-256-512 channels for
  ``width = 64``), GroupNorm (32 groups) or the original BatchNorm (put it in eval mode
  for D: batch statistics couple the samples).
- ``gpt``: a GPT-style decoder (Radford et al. 2019): token and learned position
  embeddings (``pos(torch.arange(T))``, no batch dimension, as GPT code writes it),
  pre-LayerNorm blocks of causal self-attention through ``scaled_dot_product_attention``
  and a GELU MLP, a final LayerNorm, and an lm ``head`` tied to the token embedding.
  Input ``(B, T)`` token ids, output ``(B, T, vocab)`` logits (``num_classes`` is the
  vocabulary): the per-token ``"cross_entropy"`` takes them with ``(B, T)`` targets.
  GPT-2 small (124M parameters) is ``dim=768, depth=12, heads=12``, vocabulary 50257.

Examples:
    >>> model = build_model("fc", input_shape=(1, 28, 28), num_classes=10, depth=2)
    >>> [name for name, _ in model.named_children() if name.startswith(("fc", "out"))]
    ['fc1', 'fc2', 'out']
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from sgdgeom.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MODELS",
    "NORMS",
    "GPT",
    "RESNET18_NORMS",
    "ConvNet",
    "FullyConnected",
    "ResNet",
    "ResNet18",
    "Transformer",
    "build_model",
    "kaiming_init",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> Callable[[], nn.Module]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class FullyConnected(nn.Module):
    """Flatten, then hidden layers ``fc1..fcL`` with an activation each, then ``out``.

    Shapes: input ``(B, *input_shape)``, output ``(B, num_classes)`` logits.
    """

    def __init__(
        self, in_features: int, num_classes: int, widths: Sequence[int], activation: str = "relu"
    ) -> None:
        super().__init__()
        act = _activation(activation)
        self.flatten = nn.Flatten()
        self.hidden = [f"fc{i}" for i in range(1, len(widths) + 1)]
        fan_in = in_features
        for name, width in zip(self.hidden, widths, strict=True):
            self.add_module(name, nn.Linear(fan_in, width))
            self.add_module(f"act_{name}", act())
            fan_in = width
        self.out = nn.Linear(fan_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for name in self.hidden:
            x = getattr(self, f"act_{name}")(getattr(self, name)(x))
        return self.out(x)


class ConvNet(nn.Module):
    """Musso's CNNs (24), (25): ``conv1, conv2``, max-pool, ``conv3..conv5``, max-pool,
    then a fully connected head ``fc1, fc2, out`` whose hidden width equals the flattened
    feature size. All kernels are 3x3 without padding; pools are 2x2.

    Shapes: input ``(B, C, H, W)``, output ``(B, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (64, 64, 128, 128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ConfigError(f"ConvNet needs 5 conv channel counts, got {list(channels)}")
        act = _activation(activation)
        c, h, w = input_shape
        stages = (channels[:2], channels[2:])
        layers: list[tuple[str, nn.Module]] = []
        index = 0
        for stage_index, stage in enumerate(stages, start=1):
            for out_c in stage:
                index += 1
                layers += [(f"conv{index}", nn.Conv2d(c, out_c, 3)), (f"act_conv{index}", act())]
                c, h, w = out_c, h - 2, w - 2
            layers.append((f"pool{stage_index}", nn.MaxPool2d(2)))
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(f"input {tuple(input_shape)} is too small for ConvNet")
        width = c * h * w
        layers += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(width, width)),
            ("act_fc1", act()),
            ("fc2", nn.Linear(width, width)),
            ("act_fc2", act()),
            ("out", nn.Linear(width, num_classes)),
        ]
        for name, module in layers:
            self.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


class SmallCNN(nn.Module):
    """Two padded 3x3 convolutions with a max-pool between, then ``out``; for tests."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 4,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        act = _activation(activation)
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, channels, 3, padding=1)
        self.act_conv1 = act()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act_conv2 = act()
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels * (h // 2) * (w // 2), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act_conv1(self.conv1(x)))
        return self.out(self.flatten(self.act_conv2(self.conv2(x))))


NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "group": lambda channels, groups: nn.GroupNorm(math.gcd(groups, channels), channels),
    "batch": lambda channels, groups: nn.BatchNorm2d(channels),
}
"""The normalisation layers of the residual blocks, by name: ``(channels, groups) -> layer``."""


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind not in NORMS:
        raise ConfigError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
    return NORMS[kind](channels, groups)


class ResidualBlock(nn.Module):
    """``relu(x + norm2(conv2(relu(norm1(conv1(x))))))``, shapes kept."""

    def __init__(self, channels: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, channels, groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A small ResNet: ``stem`` (3x3 conv, norm, ReLU), ``blocks`` residual blocks
    ``block1..``, global average pool, ``out``. Input ``(B, C, H, W)``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 16,
        blocks: int = 2,
        norm: str = "group",
        groups: int = 4,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False)
        self.stem_norm = _norm(norm, channels, groups)
        self.blocks = nn.Sequential(*(ResidualBlock(channels, norm, groups) for _ in range(blocks)))
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(torch.relu(self.stem_norm(self.stem(x))))
        return self.out(h.mean((2, 3)))


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(32, channels), channels)


RESNET18_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "group": _group_norm,
    "batch": nn.BatchNorm2d,
}
"""ResNet-18's normalisation layers, by name: ``channels -> layer``."""


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions, each followed by a norm, and a shortcut
    (a strided 1x1 convolution and a norm where the shape changes)."""

    def __init__(
        self, inputs: int, channels: int, stride: int, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
        self.norm1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = norm(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, channels, 1, stride, bias=False), norm(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR layout: ``stem`` (3x3, ``width`` channels) and ``stem_norm``,
    ``stage1..stage4`` of two :class:`BasicBlock` each (``width`` · 1, 2, 4, 8 channels,
    stride 2 from the second stage on), global average pool, ``out``. Input
    ``(B, C, H, W)``; ``width = 64`` is the original (11.2M parameters for 10 classes)."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = 64, norm: str = "group"
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"ResNet-18 needs image input (C, H, W), got {tuple(input_shape)}")
        if norm not in RESNET18_NORMS:
            raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(RESNET18_NORMS)}")
        make = RESNET18_NORMS[norm]
        self.stem = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.stem_norm = make(width)
        stages, inputs = [], width
        for k in range(4):
            channels = width * 2**k
            stride = 1 if k == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(inputs, channels, stride, make),
                    BasicBlock(channels, channels, 1, make),
                )
            )
            inputs = channels
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.out = nn.Linear(inputs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem_norm(self.stem(x)))
        h = self.stage4(self.stage3(self.stage2(self.stage1(h))))
        return self.out(h.mean((2, 3)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``qkv`` Linear, ``scaled_dot_product_attention``
    with ``is_causal=True``, one ``proj`` Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, dim = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, dim // self.heads).unbind(2)
        h = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(h.transpose(1, 2).reshape(b, t, dim))


class DecoderBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU, ``4·dim`` hidden)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp_proj(nn.functional.gelu(self.fc(self.norm2(x))))


class GPT(nn.Module):
    """A GPT-style decoder (see the module doc): ``tok``, ``pos``, ``blocks.0..``,
    ``norm``, ``head`` (its weight is ``tok.weight``). ``(B, T)`` ids -> ``(B, T, vocab)``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(f"gpt takes token ids (T,), got {tuple(input_shape)}")
        if depth < 1:
            raise ConfigError(f"gpt needs depth >= 1 blocks, got {depth}")
        self.context = input_shape[0]
        self.tok = nn.Embedding(num_classes, dim)
        self.pos = nn.Embedding(self.context, dim)
        self.blocks = nn.Sequential(*(DecoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)  # no batch dimension
        h = self.blocks(self.tok(x) + self.pos(positions))
        return self.head(self.norm(h))


class Transformer(nn.Module):
    """A pre-LayerNorm transformer encoder classifier.

    Input ``(B, T)`` token ids when ``vocab`` is given (``embed`` is an Embedding), else
    ``(B, T, F)`` features or ``(B, C, H, W)`` images read as H tokens of C·W features
    (``embed`` is a Linear). Then learned positions ``pos``, ``depth`` encoder layers
    ``layers.0..`` (self-attention with ``heads`` heads, GELU MLP of ``4·dim``, no dropout),
    a final LayerNorm ``norm``, mean pooling over tokens and ``out``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        vocab: int | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if depth < 1:
            raise ConfigError(f"a transformer needs depth >= 1 encoder layers, got {depth}")
        if vocab is not None:
            if len(shape) != 1:
                raise ConfigError(f"token input must be (T,), got {shape}")
            self.embed: nn.Module = nn.Embedding(vocab, dim)
        elif len(shape) in (2, 3):
            self.embed = nn.Linear(shape[-1] * (shape[0] if len(shape) == 3 else 1), dim)
        else:
            raise ConfigError(f"transformer input must be (T,), (T, F) or (C, H, W), got {shape}")
        self.tokens = shape[1] if len(shape) == 3 else shape[0]
        self.pos = nn.Embedding(self.tokens, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C·W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        positions = torch.arange(self.tokens, device=x.device).expand(len(x), -1)
        h = self.layers(self.embed(x) + self.pos(positions))
        return self.out(self.norm(h).mean(1))


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (He et al. 2015, fan-in, ReLU gain) and zero biases for every
    Linear and Conv2d layer, as Musso §5 uses. Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _fc(
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 2,
    width: int = 784,
    activation: str = "relu",
) -> nn.Module:
    if depth not in (1, 2, 3, 4):
        raise ConfigError(f"fc depth must be 1, 2, 3 or 4 hidden layers, got {depth}")
    return FullyConnected(math.prod(input_shape), num_classes, [width] * depth, activation)


def _mlp(
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 16),
    activation: str = "tanh",
) -> nn.Module:
    return FullyConnected(math.prod(input_shape), num_classes, list(widths), activation)


def _cnn(channels: tuple[int, ...]) -> Callable[..., nn.Module]:
    def build(input_shape: Sequence[int], num_classes: int, activation: str = "relu") -> nn.Module:
        if len(input_shape) != 3:
            raise ConfigError(f"a CNN needs image input (C, H, W), got {tuple(input_shape)}")
        return ConvNet(input_shape, num_classes, channels, activation)

    return build


def _small_cnn(
    input_shape: Sequence[int], num_classes: int, channels: int = 4, activation: str = "relu"
) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"a CNN needs image input (C, H, W), got {tuple(input_shape)}")
    return SmallCNN(input_shape, num_classes, channels, activation)


INITS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "default": lambda model: model,  # PyTorch's own initialisation
    "kaiming": kaiming_init,
}
"""The initialisations a config names (``model.init``)."""

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fc": _fc,
    "mlp": _mlp,
    "cnn-cifar10": _cnn((64, 64, 128, 128, 128)),
    "cnn-stl10": _cnn((8, 8, 16, 16, 16)),
    "small-cnn": _small_cnn,
    "resnet-gn": functools.partial(ResNet, norm="group"),
    "resnet-bn": functools.partial(ResNet, norm="batch"),
    "transformer": Transformer,
    "resnet18-gn": functools.partial(ResNet18, norm="group"),
    "resnet18-bn": functools.partial(ResNet18, norm="batch"),
    "gpt": GPT,
}


MODEL_LIMIT = 2 * 10**9
"""The most parameters a model built by name may have (8 GiB in float32); a model built on
the meta device (shapes only, as ``sgdgeom table1`` does) may have any number."""


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    init: Literal["default", "kaiming"] = "default",
    **options: object,
) -> nn.Module:
    """Build a model by name (see :data:`MODELS`).

    Args:
        name: a key of :data:`MODELS`.
        input_shape: the shape of one sample, e.g. ``(1, 28, 28)``.
        num_classes: the number of output logits.
        init: ``"default"`` (PyTorch's) or ``"kaiming"`` (see :func:`kaiming_init`).
        **options: the builder's own options, e.g. ``depth``, ``width``, ``activation``.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    try:
        with warnings.catch_warnings():  # an empty layer is refused below, with its name
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            with torch.device("meta"):  # sized first, without memory
                size = sum(
                    p.numel()
                    for p in MODELS[name](tuple(input_shape), num_classes, **options).parameters()
                )
            if size > MODEL_LIMIT and torch.get_default_device().type != "meta":
                raise ConfigError(
                    f"model {name!r} with options {options} has {size:,} parameters "
                    f"({4 * size / 2**30:.1f} GiB in float32), more than {MODEL_LIMIT:,}: "
                    f"choose smaller widths"
                )
            model = MODELS[name](tuple(input_shape), num_classes, **options)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"bad options {options} for model {name!r}: {first}") from None
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(
            f"bad options {options} for model {name!r}: parameter {empty[0]} is empty; every "
            f"width, depth and channel count must be >= 1"
        )
    return INITS[init](model)
