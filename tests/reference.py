"""Dense brute-force references: explicit per-sample gradients and explicit matrices.

Everything here loops over samples with plain autograd, in the model's dtype (float64 in
the tests). It is slow and obviously correct; the fast routes are compared against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def per_sample_gradients(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """G, ``(N, d)``: row i is the gradient of sample i's loss, one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        value = loss(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def dense_diffusion(G: Tensor) -> Tensor:
    """(F3): D = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ."""
    centred = G - G.mean(0)
    return centred.T @ centred / len(G)


def per_sample_hessians(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """H_i, ``(N, d, d)``: the explicit Hessian of each sample's loss."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def sample_loss(flat: Tensor, i: int) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        out = torch.func.functional_call(model, params, (x[i : i + 1],))
        return loss(out, y[i : i + 1]).sum()

    with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernel has no 2nd derivative
        return torch.stack(
            [
                torch.autograd.functional.hessian(lambda f, i=i: sample_loss(f, i), flat0)
                for i in range(len(x))
            ]
        )


def assert_close(
    actual: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-10, what: str = ""
) -> None:
    """torch.testing.assert_close that prints the entries that disagree."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as err:
        if actual.shape != expected.shape:
            raise
        diff = (actual - expected).abs()
        bad = torch.nonzero(diff > atol + rtol * expected.abs())[:10]
        rows = [
            f"  {tuple(i.tolist())}: got {actual[tuple(i)]:.6e} expected {expected[tuple(i)]:.6e}"
            for i in bad
        ]
        raise AssertionError(f"{what} disagrees:\n" + "\n".join(rows)) from err


@dataclass
class Case:
    """A test case: a float64 model, a loss and a dataset."""

    name: str
    model: nn.Module
    loss: object  # a loss name, module or function (see per_sample_loss)
    x: Tensor
    y: Tensor


def dense_divergence(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """(∇·D)_k = Σ_j ∂D_jk/∂θ_j: D(θ) built from per-sample gradients taken with
    ``create_graph``, then differentiated once more, row by row, with plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        value = loss(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(value, params, create_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    G = torch.stack(rows)
    centred = G - G.mean(0)
    D = centred.T @ centred / len(G)
    out = torch.zeros(D.shape[0], dtype=D.dtype)
    for j in range(D.shape[0]):  # Σ_k over rows: ∂_j of row j of D, all k at once
        row_grads = [
            torch.autograd.grad(D[j, k], params, retain_graph=True) for k in range(D.shape[0])
        ]
        for k, gs in enumerate(row_grads):
            out[k] += torch.cat([g.reshape(-1) for g in gs])[j]
    return out
