r"""The gradient noise scale and the critical batch size (McCandlish et al. 2018).

McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch Training* (2018),
read the covariance of the per-example gradients through one number, the *simple noise
scale*

.. math::

    B_{\text{noise}} = \frac{\operatorname{tr}\Sigma}{\lVert G\rVert^2},

with :math:`G` the true gradient and :math:`\Sigma` the per-example covariance. It predicts
the trade-off of training at batch size B against the steps ``S`` and examples ``E`` it
needs (their eqs. 2.11–2.12): :math:`S/S_{\min} = 1 + B_{\text{noise}}/B` and
:math:`E/E_{\min} = 1 + B/B_{\text{noise}}`; the critical batch size, where both
overheads are equal, is :math:`B_{\text{noise}}` itself.

**The mapping.** Over a dataset of N samples, :math:`\Sigma` is the diffusion matrix D of
``docs/design.md`` (the covariance with ``1/N``) and :math:`G` is :math:`\bar g`, the mean
gradient: :func:`dataset_noise` computes them exactly, per layer. On a minibatch of B samples
they are estimated without bias (the paper's appendix A):

- within one batch, from the per-sample squared norms (:func:`batch_estimate`):
  :math:`\widehat{\operatorname{tr}\Sigma} = \frac{B}{B-1}\big(\frac1B\sum_i\lVert g_i\rVert^2
  - \lVert\bar g_B\rVert^2\big)` and :math:`\widehat{\lVert G\rVert^2} = \lVert\bar
  g_B\rVert^2 - \widehat{\operatorname{tr}\Sigma}/B`;
- across processes, from the local gradients of ``b`` samples and the all-reduced one of
  ``B`` (:func:`cross_process_estimate`), with no per-sample work:
  :math:`\widehat{\lVert G\rVert^2} = \frac{B\lVert G_B\rVert^2 - b\lVert G_b\rVert^2}{B - b}`,
  :math:`\widehat{\operatorname{tr}\Sigma} = \frac{\lVert G_b\rVert^2 - \lVert
  G_B\rVert^2}{1/b - 1/B}`.

Both estimators are sums over parameters, so each layer has its own, and the layers' add
up to the total. Their ratio is biased and noisy step by step: :class:`RatioOfAverages`
smooths numerator and denominator separately, as the paper recommends, with a standard
error.

Examples:
    >>> import torch
    >>> sq_norms = torch.tensor([[4.0], [0.0]])       # ‖g_i‖², 2 samples, 1 parameter
    >>> mean_sq = torch.tensor([1.0])                 # ‖ḡ‖² with ḡ = (g_1 + g_2) / 2
    >>> estimate = batch_estimate(sq_norms, mean_sq, {"fc": [0]})
    >>> estimate.trace, estimate.grad_sq              # 2/1 (2 − 1) and 1 − 2/2
    (2.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError

__all__ = [
    "NoiseEstimate",
    "RatioOfAverages",
    "batch_estimate",
    "cross_process_estimate",
    "dataset_noise",
    "examples_ratio",
    "layer_groups",
    "noise_scale",
    "steps_ratio",
]


@dataclass(frozen=True)
class NoiseEstimate:
    """``tr Σ`` and ``‖G‖²`` (estimated or exact), in total and per layer, at batch size
    ``batch`` (the dataset's size for an exact one).

    Attributes:
        trace: ``tr Σ``.
        grad_sq: ``‖G‖²``.
        batch: the batch size the estimate came from.
        layers: ``{layer: (tr Σ_I, ‖G_I‖²)}``.
    """

    trace: float
    grad_sq: float
    batch: int
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def b_noise(self) -> float:
        """``B_noise = tr Σ / ‖G‖²`` (``inf`` where the estimate of ``‖G‖²`` is not
        positive: the noise drowns the gradient)."""
        return noise_scale(self.trace, self.grad_sq)

    def layer_b_noise(self) -> dict[str, float]:
        """Each layer's ``B_noise``."""
        return {name: noise_scale(t, g) for name, (t, g) in self.layers.items()}

    def as_dict(self, prefix: str = "noise") -> dict[str, float]:
        """Flat metrics: ``noise/trace``, ``noise/grad_sq``, ``noise/b_noise``, and
        ``noise/I/...`` for each layer I."""
        out = {
            f"{prefix}/trace": self.trace,
            f"{prefix}/grad_sq": self.grad_sq,
            f"{prefix}/b_noise": self.b_noise,
        }
        for name, (trace, grad_sq) in self.layers.items():
            out[f"{prefix}/{name}/trace"] = trace
            out[f"{prefix}/{name}/grad_sq"] = grad_sq
            out[f"{prefix}/{name}/b_noise"] = noise_scale(trace, grad_sq)
        return out


def noise_scale(trace: float, grad_sq: float) -> float:
    """``tr Σ / ‖G‖²``, ``inf`` where ``‖G‖² ≤ 0``."""
    return trace / grad_sq if grad_sq > 0 else math.inf


def steps_ratio(b_noise: float, batch: float) -> float:
    """``S / S_min = 1 + B_noise / B``: the steps at batch size B against the fewest."""
    return 1.0 + b_noise / batch


def examples_ratio(b_noise: float, batch: float) -> float:
    """``E / E_min = 1 + B / B_noise``: the examples at batch size B against the fewest."""
    return 1.0 + batch / b_noise


def layer_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """The parameters' indices grouped by layer (the module that owns them: the name
    without its last part), in order."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(index)
    return groups


def _by_layer(
    trace: Tensor, grad_sq: Tensor, groups: Mapping[str, Sequence[int]], batch: int
) -> NoiseEstimate:
    """Per-parameter ``tr Σ`` and ``‖G‖²`` ``(P,)`` summed by layer and in total."""
    trace, grad_sq = trace.double().cpu(), grad_sq.double().cpu()
    layers = {
        name: (float(trace[list(indices)].sum()), float(grad_sq[list(indices)].sum()))
        for name, indices in groups.items()
    }
    return NoiseEstimate(float(trace.sum()), float(grad_sq.sum()), batch, layers)


def batch_estimate(
    sq_norms: Tensor, mean_sq: Tensor, groups: Mapping[str, Sequence[int]]
) -> NoiseEstimate:
    """The within-batch unbiased estimates (module doc) from the per-sample squared norms
    ``sq_norms`` ``(B, P)`` and the squared norms of the batch's mean gradient ``mean_sq``
    ``(P,)``, parameter by parameter, grouped into layers by ``groups``."""
    batch = sq_norms.shape[0]
    if batch < 2:
        raise InputError("a noise estimate needs a batch of at least 2 samples (a variance)")
    if not bool(sq_norms.any()):
        raise InputError(
            "every per-sample gradient of the batch is zero: there is no gradient and no "
            "noise to measure (a loss at its minimum, or parameters that do not reach it)"
        )
    trace = batch / (batch - 1) * (sq_norms.mean(0) - mean_sq)
    return _by_layer(trace, mean_sq - trace / batch, groups, batch)


def cross_process_estimate(
    local_sq: Tensor,
    global_sq: Tensor,
    local_batch: int,
    global_batch: int,
    groups: Mapping[str, Sequence[int]],
) -> NoiseEstimate:
    """The cross-process unbiased estimates (module doc) from the squared norms ``(P,)`` of
    the local gradients (of ``local_batch`` samples; averaged over the processes) and of the
    all-reduced one (of ``global_batch``)."""
    if global_batch <= local_batch:
        raise InputError("the cross-process estimate needs more than one process")
    small, big = float(local_batch), float(global_batch)
    grad_sq = (big * global_sq - small * local_sq) / (big - small)
    trace = (local_sq - global_sq) / (1 / small - 1 / big)
    return _by_layer(trace, grad_sq, groups, global_batch)


def dataset_noise(D: DiffusionMatrix) -> NoiseEstimate:
    """``tr D`` and ``‖ḡ‖²`` of a whole dataset, exactly, per layer: Σ is D and G is ḡ
    (module doc). ``batch`` is the dataset's size N."""
    space = D.space
    traces = torch.tensor(list(D.param_traces().values()), dtype=torch.float64)
    mean = space.unflatten(D.mean_gradient())
    grad_sq = torch.stack([mean[name].double().square().sum().cpu() for name in space.names])
    return _by_layer(traces, grad_sq, layer_groups(space.names), D.n)


class RatioOfAverages:
    """``B_noise`` smoothed: exponential moving averages of ``tr Σ`` and ``‖G‖²``, each
    bias-corrected as Adam's moments are, and their ratio, with a standard error.

    The standard error is the delta method's for a ratio of weighted means, with the
    estimates' scatter (their weighted second moments) and the weights of the average
    (``Σ w_k²``: ``1/t`` after t equal-weight steps, ``(1 − β)/(1 + β)`` in the long run):
    steps are treated as independent, which minibatches drawn afresh are.

    Args:
        decay: ``β`` in (0, 1); the paper's smoothing keeps about ``1/(1 − β)`` steps.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0 < decay < 1:
            raise InputError(f"the decay of the moving average must lie in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self._moments = torch.zeros(5, dtype=torch.float64)  # n, d, n², d², n d

    def update(self, trace: float, grad_sq: float) -> None:
        """Add one step's estimates."""
        values = torch.tensor(
            [trace, grad_sq, trace * trace, grad_sq * grad_sq, trace * grad_sq],
            dtype=torch.float64,
        )
        self._moments.mul_(self.decay).add_(values, alpha=1 - self.decay)
        self.steps += 1

    def _means(self) -> Tensor:
        return self._moments / (1 - self.decay**self.steps)

    @property
    def trace(self) -> float:
        """The smoothed ``tr Σ``."""
        return float(self._means()[0]) if self.steps else math.nan

    @property
    def grad_sq(self) -> float:
        """The smoothed ``‖G‖²``."""
        return float(self._means()[1]) if self.steps else math.nan

    @property
    def value(self) -> float:
        """The smoothed ``B_noise``."""
        return noise_scale(self.trace, self.grad_sq) if self.steps else math.nan

    @property
    def standard_error(self) -> float:
        """The standard error of :attr:`value` (``nan`` before two steps)."""
        if self.steps < 2:
            return math.nan
        n, d, nn, dd, nd = (float(m) for m in self._means())
        if d <= 0:
            return math.inf
        beta, t = self.decay, self.steps
        weights_sq = (1 - beta) ** 2 * (1 - beta ** (2 * t)) / ((1 - beta**t) ** 2 * (1 - beta**2))
        var_n, var_d, cov = nn - n * n, dd - d * d, nd - n * d
        relative = max(var_n / n**2 + var_d / d**2 - 2 * cov / (n * d), 0.0) if n else math.inf
        return abs(n / d) * math.sqrt(relative * weights_sq)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "steps": self.steps, "moments": self._moments.tolist()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.steps = int(state["steps"])  # type: ignore[call-overload]
        self._moments = torch.tensor(state["moments"], dtype=torch.float64)
