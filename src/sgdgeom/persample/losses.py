r"""Per-sample losses :math:`f_i`, ``(output, target) -> (B,)``, from names, modules or functions.

With ``docs/design.md``'s :math:`f = \frac1N \sum_i f_i`, every product of the per-sample
gradients needs the vector of the :math:`f_i`, never their mean, so a loss that already
reduces over the batch
(``F.cross_entropy`` with its default ``reduction="mean"``) is mapped to its per-sample form
or refused: summing a mean would silently scale D by :math:`N^2`.

Examples:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> loss = per_sample_loss(F.cross_entropy)
    >>> loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).shape
    torch.Size([4])
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import cast

from torch import Tensor, nn
from torch.nn import functional as F

from sgdgeom.errors import InputError, UnsupportedModelError

__all__ = [
    "LossSpec",
    "PerSampleLoss",
    "check_graph_independent",
    "check_independent_samples",
    "per_sample_loss",
]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
LossSpec = str | nn.Module | PerSampleLoss

_MODULES: dict[str, type[nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.cross_entropy: "cross_entropy",
    F.mse_loss: "mse",
    F.binary_cross_entropy_with_logits: "bce_with_logits",
}
_NEEDS_PER_SAMPLE = (
    "a per-sample loss (output, target) -> (B,) is needed, one value per sample; "
    "pass 'cross_entropy', 'mse', 'bce_with_logits', their nn modules or F functions, or a "
    "function with reduction='none'"
)


def _mean_per_sample(loss: Tensor) -> Tensor:
    """``(B, ...) -> (B,)``: sample i's loss is the mean over its elements."""
    return loss.reshape(loss.shape[0], -1).mean(1) if loss.dim() > 1 else loss


def _from_function(function: Callable[..., Tensor], keywords: dict) -> PerSampleLoss:
    if "weight" in keywords and keywords["weight"] is not None:
        raise UnsupportedModelError(
            "a class-weighted loss is not a mean of per-sample losses; drop `weight`"
        )
    options = {k: v for k, v in keywords.items() if k not in ("reduction", "size_average")}
    if function is F.cross_entropy:
        return functools.partial(_cross_entropy, **options)
    return lambda output, target: _mean_per_sample(
        function(output, target, reduction="none", **options)
    )


def _cross_entropy(
    output: Tensor, target: Tensor, ignore_index: int = -100, **options: object
) -> Tensor:
    """Sample i's cross-entropy: the mean over its positions whose target is not
    ``ignore_index`` (padding). Logits ``(B, C)``, ``(B, C, d...)`` as torch lays them out,
    or ``(B, T, V)`` with ``(B, T)`` targets as language models do (classes last); where
    both readings fit (``T = V``) the layout is ambiguous and refused."""
    if output.dim() > 2 and target.dim() == output.dim() - 1 and not target.is_floating_point():
        classes_last = target.shape == output.shape[:-1]
        classes_first = target.shape == (output.shape[0], *output.shape[2:])
        if classes_last and classes_first:
            raise InputError(
                f"cross_entropy cannot tell the classes from the positions in logits of shape "
                f"{tuple(output.shape)} with targets {tuple(target.shape)}: pass the logits as "
                f"(B, classes, positions), torch's layout, or with a different sequence length"
            )
        if classes_last:
            output = output.movedim(-1, 1)
    values = F.cross_entropy(
        output,
        target,
        reduction="none",
        ignore_index=ignore_index,
        **options,  # type: ignore[arg-type]
    )
    if values.dim() == 1 or target.is_floating_point():
        return _mean_per_sample(values)
    kept = target.ne(ignore_index).reshape(len(target), -1).sum(1).clamp_min(1)
    return values.reshape(len(values), -1).sum(1) / kept


def _checked(function: PerSampleLoss) -> PerSampleLoss:
    """A user's function, checked on every call to return one loss per sample."""

    @functools.wraps(function)
    def loss(output: Tensor, target: Tensor) -> Tensor:
        value = function(output, target)
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != len(output):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UnsupportedModelError(
                f"the loss function returned {shape} for a batch of {len(output)}: "
                f"{_NEEDS_PER_SAMPLE}"
            )
        return _mean_per_sample(value)

    return loss


def per_sample_loss(loss_fn: LossSpec) -> PerSampleLoss:
    r"""The per-sample loss ``(output, target) -> (B,)`` of a loss name, module or function.

    Accepted:

    - ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``;
    - an instance of ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss``, or
      ``F.cross_entropy``, ``F.mse_loss``, ``F.binary_cross_entropy_with_logits`` (also as a
      ``functools.partial``): their options (label smoothing, ``pos_weight``...) are kept and
      their reduction is replaced by the per-sample one;
    - any other function returning ``(B,)`` (or ``(B, ...)``, averaged per sample); it is
      checked on every call, and a scalar (an already-averaged loss) is refused.

    :math:`f_i` is the mean over sample i's elements, so the module's ``"mean"`` loss is
    :math:`f = \frac1N \sum_i f_i`. Cross-entropy takes language models' per-token
    logits too, ``(B, T, V)`` with ``(B, T)`` targets: sample i's loss is the mean over its
    tokens, those whose target is ``ignore_index`` (padding) left out. (With padding, torch's
    own ``"mean"`` divides by the batch's count of tokens instead: the two agree when
    every sample has as many tokens.)
    """
    if isinstance(loss_fn, str):
        if loss_fn not in _MODULES:
            raise InputError(f"unknown loss {loss_fn!r}; choose one of {', '.join(_MODULES)}")
        loss_fn = _MODULES[loss_fn]()
    if isinstance(loss_fn, tuple(_MODULES.values())):
        if getattr(loss_fn, "weight", None) is not None:
            raise UnsupportedModelError(
                "a class-weighted loss is not a mean of per-sample losses; drop `weight`"
            )
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            return functools.partial(
                _cross_entropy,
                ignore_index=loss_fn.ignore_index,
                label_smoothing=loss_fn.label_smoothing,
            )
        module = copy.copy(cast(nn.Module, loss_fn))
        module.reduction = "none"  # type: ignore[assignment]  # a loss module's attribute
        return lambda output, target: _mean_per_sample(module(output, target))
    if isinstance(loss_fn, nn.Module):
        raise UnsupportedModelError(
            f"unsupported loss module {type(loss_fn).__name__}; use CrossEntropyLoss, MSELoss, "
            f"BCEWithLogitsLoss or a function (output, target) -> per-sample losses (B,)"
        )
    if loss_fn in _FUNCTIONS:
        return _from_function(loss_fn, {})
    if isinstance(loss_fn, functools.partial) and loss_fn.func in _FUNCTIONS and not loss_fn.args:
        return _from_function(loss_fn.func, dict(loss_fn.keywords))
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a name, a loss module or a function, got {loss_fn!r}")
    return _checked(loss_fn)


def check_independent_samples(model: nn.Module, dropout: bool = True) -> None:
    """Raise if a module couples the samples of a batch or makes the model random, naming it.

    BatchNorm in train mode (or without running statistics) normalises with batch
    statistics, so a sample's loss depends on the other samples and per-sample gradients are
    not defined (as an Embedding with ``scale_grad_by_freq`` couples their gradients);
    Dropout in train mode with ``p > 0`` draws a new mask on every pass, so two
    products would not see the same function (``dropout=False`` allows it: a training step's
    one forward has one mask, and its per-sample gradients are those of that forward).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise UnsupportedModelError(
                f"BatchNorm layer {name!r} normalises with batch statistics (train mode or no "
                f"running statistics), so the samples of a batch are not independent and "
                f"per-sample gradients are not defined: use GroupNorm or LayerNorm, or call "
                f"model.eval() on a BatchNorm that tracks running statistics"
            )
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.scale_grad_by_freq:
            raise UnsupportedModelError(
                f"Embedding {name!r} has scale_grad_by_freq=True: it divides each row's "
                f"gradient by the row's count over the whole batch, so the samples of a batch "
                f"are not independent and per-sample gradients are not defined; set "
                f"scale_grad_by_freq=False"
            )
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None:
            raise UnsupportedModelError(
                f"Embedding {name!r} has max_norm={module.max_norm}: its forward rescales rows "
                f"of its weight in place, which a per-sample computation cannot repeat; set "
                f"max_norm=None and renormalise after each step instead (torch.embedding_renorm_ "
                f"under torch.no_grad())"
            )
        if not dropout:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise UnsupportedModelError(
                f"Dropout layer {name!r} is in train mode, so the model is random; call "
                f"model.eval() for per-sample products"
            )


def check_graph_independent(losses: Tensor) -> None:
    """Raise if the graph of per-sample ``losses`` normalises with batch statistics: a
    BatchNorm in train mode, found among the graph's nodes (so a closure over parameters,
    with no model to inspect, is checked too)."""
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "BatchNorm" in type(node).__name__ and getattr(node, "_saved_training", True):
            raise UnsupportedModelError(
                f"the losses' graph holds a BatchNorm in train mode ({type(node).__name__}): "
                f"it normalises with batch statistics, so the samples of a batch are not "
                f"independent and per-sample gradients are not defined: use GroupNorm or "
                f"LayerNorm, or call .eval() on the BatchNorm layers"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
