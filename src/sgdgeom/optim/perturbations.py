r"""A counter-based uniform source for the displacements of partial local entropy.

Coordinate ``j`` of displacement ``a`` of stream ``s`` (a smoothed layer) under the step key
``k`` is a pure function of ``(k, s, a, j)``: the SplitMix64 finaliser (Steele, Lea, Flood
2014) of ``k_{s,a} + (⌊j/2⌋ + 1) γ`` (mod 2⁶⁴), with ``γ = 0x9E3779B97F4A7C15`` and
``k_{s,a}`` = mix(mix(k + s γ) + a γ) (:func:`point_key`), gives 64 bits; its low and high
32-bit halves give coordinates ``2i`` and ``2i + 1``, each through its top 24 bits
``u ∈ [0, 2²⁴)``:

.. math::

    \Delta_j = h \cdot \frac{2u + 1 - 2^{24}}{2^{24}} \in (-h, h),

the midpoints of ``2²⁴`` equal cells of the box of half-side ``h``: uniform at 24 bits, mean
exactly 0, and symmetric, so ``-Δ`` lies on the same grid (the antithetic pairs of
:class:`~sgdgeom.optim.local_entropy.PartialLocalEntropy`). ``(2u + 1 - 2²⁴) 2⁻²⁴`` is exact
in float32, and the product with ``h`` is one rounding in the output's dtype.

Because nothing is sequential, the buffer fills on every core at once. On the CPU a
``numba`` kernel does it, on torch's number of threads (``torch.set_num_threads``; install
it with ``pip install 'sgdgeom[fast]'``). Without numba, and on an accelerator, the same
arithmetic runs as torch integer operations on the tensor's device. Both give the same
bits, on every device and every DDP rank that uses the same key.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgdgeom.extras import numba_parallel, numba_threads

__all__ = ["draw_key", "point_key", "uniform_"]

GOLDEN = 0x9E3779B97F4A7C15  # γ, the SplitMix64 increment (2⁶⁴ / golden ratio, odd)
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
BITS = 24  # random bits per coordinate
_SLOW_CPU_DRAW = 1 << 16  # a CPU draw this large without numba warns once


def _mix(z: int) -> int:
    """The SplitMix64 finaliser of a Python integer, mod 2⁶⁴."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def point_key(key: int, stream: int, point: int) -> int:
    """The key of displacement ``point`` of stream ``stream`` (a smoothed layer) under the
    step key ``key``."""
    return _mix(_mix(key + stream * GOLDEN) + point * GOLDEN)


def draw_key(generator: torch.Generator | None = None) -> int:
    """A fresh 64-bit key from a torch generator (torch's global one when None): one draw,
    so a seeded generator reproduces the keys, and ranks seeded alike share them."""
    device = generator.device if generator is not None else "cpu"
    low, high = torch.randint(
        0, 1 << 32, (2,), generator=generator, device=device, dtype=torch.int64
    ).tolist()
    return low | (high << 32)


def _signed(z: int) -> int:
    """``z`` mod 2⁶⁴ as a signed 64-bit integer (torch's int64 wraps the same way)."""
    z &= MASK64
    return z - (1 << 64) if z >> 63 else z


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """``z >> bits`` of the unsigned 64-bit value that the int64 ``z`` holds."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _sent(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A few host numbers as a tensor on ``device``, copied from pinned memory so that the
    copy waits for nothing queued on a GPU."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _deltas(signed: Tensor, factors: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """Row ``a``: ``factors[a] (2u + 1 - 2²⁴)`` of ``count`` coordinates under the key
    ``signed[a + 1]`` (int64; ``signed[0]`` is γ), ``(rows, count)`` in ``dtype``: one set
    of elementwise kernels for all the rows (on a GPU each kernel is a launch; compiled,
    one kernel in all)."""
    z = torch.arange(1, (count + 1) // 2 + 1, dtype=torch.int64, device=signed.device)
    # γ is read from memory: compiled, a literal γ × index folded into the kernel's 32-bit
    # index arithmetic (Triton: "out of range for type int32")
    z = (z * signed[0]) + signed[1:, None]
    z = (z ^ _logical_shift(z, 30)) * _signed(MIX1)
    z = (z ^ _logical_shift(z, 27)) * _signed(MIX2)
    z = z ^ _logical_shift(z, 31)
    low = (z & 0xFFFFFFFF) >> (32 - BITS)
    high = _logical_shift(z, 64 - BITS)
    u = torch.stack([low, high], 2).reshape(len(signed) - 1, -1)[:, :count]
    return (2 * u + (1 - (1 << BITS))).to(dtype) * factors[:, None]


@functools.cache
def _compiled_deltas() -> Any:
    """:func:`_deltas` through ``torch.compile`` (one compilation per shape and dtype)."""
    return torch.compile(_deltas, dynamic=False, fullgraph=True)


@functools.cache
def _numba_kernel(parallel: bool) -> Any:
    """The CPU kernel, compiled on first use (about a second; ``parallel``: over threads,
    :func:`~sgdgeom.extras.numba_parallel`), or None without numba."""
    numba = numba_threads()
    if numba is None:
        return None
    golden, mix1, mix2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
    s30, s27, s31, s8, s40 = (np.uint64(s) for s in (30, 27, 31, 32 - BITS, 64 - BITS))
    low32, offset = np.uint64(0xFFFFFFFF), np.int32(1 - (1 << BITS))

    @numba.njit(nogil=True, cache=False)
    def bits(k: Any, i: int) -> Any:  # pragma: no cover - compiled
        z = k + np.uint64(i + 1) * golden
        z = (z ^ (z >> s30)) * mix1
        z = (z ^ (z >> s27)) * mix2
        return z ^ (z >> s31)

    @numba.njit(parallel=parallel, nogil=True, cache=False)
    def fill(out: Any, keys: Any, scales: Any, base: Any) -> None:  # pragma: no cover
        # row a: the odd integers (exact in out's dtype), times scales[a] (one rounding),
        # plus base (one more rounding, as base + Δ in torch)
        size = out.shape[1]
        pairs = size // 2
        for a in range(out.shape[0]):
            k, scale, row = keys[a], scales[a], out[a]
            for i in numba.prange(pairs):
                z = bits(k, i)
                row[2 * i] = np.int32(2 * ((z & low32) >> s8)) + offset
                row[2 * i + 1] = np.int32(2 * (z >> s40)) + offset
                row[2 * i] = row[2 * i] * scale
                row[2 * i + 1] = row[2 * i + 1] * scale
            if size % 2:  # the last coordinate: the low half of one more draw
                row[size - 1] = np.int32(2 * ((bits(k, pairs) & low32) >> s8)) + offset
                row[size - 1] = row[size - 1] * scale
            if base.size:
                for i in numba.prange(size):
                    row[i] = base[i] + row[i]

    return fill


def uniform_(
    out: Tensor,
    keys: Sequence[int],
    half: float,
    *,
    signs: Sequence[int] | None = None,
    base: Tensor | None = None,
    use_numba: bool = True,
    compiled: bool = False,
) -> Tensor:
    """Fill row ``a`` of ``out`` (``(points, *shape)``, float32 or float64, contiguous) with
    ``base + signs[a] Δ(keys[a])``: ``Δ`` uniform in ``(-half, half)`` at 24 bits, a pure
    function of the key and the position (module docstring); ``base`` (``shape``) defaults
    to 0 and ``signs`` to +1. ``base + Δ`` rounds as torch's ``base + Δ`` does, so the
    perturbed weights are those that adding the displacements gives. ``use_numba=False``
    forces the torch arithmetic (the reference; the same bits); ``compiled`` runs that
    arithmetic through ``torch.compile`` (one kernel on a GPU; the same bits) where numba
    does not serve."""
    if out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        raise ValueError(f"uniform_ fills contiguous float32/float64 tensors, got {out.dtype}")
    signs = [1] * len(keys) if signs is None else list(signs)
    if not len(keys) == len(signs) == len(out):
        raise ValueError(f"{len(out)} rows need as many keys and signs")
    if base is not None and base.shape != out.shape[1:]:
        raise ValueError(f"base has shape {tuple(base.shape)}, not {tuple(out.shape[1:])}")
    if out.numel() == 0:
        return out
    scale = half / (1 << BITS)  # a power of two times half: the product rounds once
    kernel = _numba_kernel(numba_parallel()) if use_numba and out.device.type == "cpu" else None
    if kernel is not None:
        rows = out.detach().view(len(out), -1).numpy()
        flat_base = (
            base.detach().to(out.dtype).reshape(-1).contiguous().numpy()
            if base is not None
            else np.empty(0, dtype=rows.dtype)
        )
        keys_array = np.array([k & MASK64 for k in keys], dtype=np.uint64)
        scales = np.array([s * scale for s in signs], dtype=rows.dtype)
        numba_threads()
        kernel(rows, keys_array, scales, flat_base)
        return out
    if use_numba and out.device.type == "cpu" and out.numel() >= _SLOW_CPU_DRAW:
        _warn_slow()
    flat = out.view(len(out), -1)
    signed = _sent([_signed(GOLDEN)] + [_signed(k) for k in keys], torch.int64, out.device)
    factors = _sent([sign * scale for sign in signs], out.dtype, out.device)
    deltas = _compiled_deltas() if compiled else _deltas
    delta = deltas(signed, factors, flat.shape[1], out.dtype)
    if base is None:
        flat.copy_(delta)
    else:  # outside the compiled part, which might fuse it into one rounding (an FMA)
        torch.add(base.reshape(1, -1), delta, out=flat)
    return out


@functools.cache
def _warn_slow() -> None:
    warnings.warn(
        "numba is not installed: the perturbations of partial local entropy are drawn with "
        "torch integer operations, tens of times slower on the CPU (the same numbers); "
        "pip install 'sgdgeom[fast]'",
        stacklevel=3,
    )
