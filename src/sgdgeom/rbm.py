r"""Bernoulli restricted Boltzmann machines, contrastive divergence as a noisy gradient, and
its diffusion matrix (Fioresi & Chaudhari, poster, "Forthcoming research").

Energy :math:`E(v, h) = -b^\top v - c^\top h - h^\top W v` with binary ``v`` (``n_visible``)
and ``h`` (``n_hidden``); free energy :math:`F(v) = -b^\top v - \sum_j
\mathrm{softplus}(c_j + W_j v)`, :math:`p(v) = e^{-F(v)} / Z`.

Training by CD-k has the poster's three phases: the *positive phase* (data ``v`` and
:math:`P(h|v)`), the *negative phase* (k Gibbs steps to ``v'`` and :math:`P(h|v')`), and
the *weight update*. The CD estimate of the loss gradient is a mean of per-sample terms

.. math::

    g_i = -\big[\,P(h|v_i) v_i^\top - P(h|v'_i) v_i'^\top,\ v_i - v'_i,\
    P(h|v_i) - P(h|v'_i)\,\big],

a noisy estimate of :math:`\nabla G`, the gradient of the KL divergence between the data
and the model (up to a constant, minus the mean log-likelihood), just as a minibatch
gradient estimates :math:`\nabla f`. Its diffusion matrix is the covariance of the
:math:`g_i`, and the diffusion-metric update :math:`-(I+\varepsilon D)^{-1}\bar g` (or the
weak field :math:`-(I-\varepsilon D)\bar g`) applies to it unchanged
(:class:`~sgdgeom.diffusion.DiffusionMatrix`, :class:`~sgdgeom.metric.DiffusionMetric`).

Parameters are flattened in the order ``W`` (``n_hidden x n_visible``), ``b``, ``c``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sgdgeom._deprecated import warn
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.epsilon import EpsilonLike
from sgdgeom.errors import InputError
from sgdgeom.metric import DiffusionMetric, Inverse, inverse_of
from sgdgeom.params import ParamSpace
from sgdgeom.persample import RowProducts

__all__ = ["RBM", "CDStatistics"]

ENUMERATION_LIMIT = 20  # exact partition functions enumerate at most 2**20 hidden states


@dataclass
class CDStatistics:
    """One CD-k estimate: the positive and negative phases of a batch.

    ``v``, ``v_neg``: ``(B, n_visible)``; ``h``, ``h_neg``: ``P(h=1|v)`` and ``P(h=1|v')``,
    ``(B, n_hidden)``.
    """

    v: Tensor
    h: Tensor
    v_neg: Tensor
    h_neg: Tensor

    def per_sample_gradients(self) -> Tensor:
        """The rows ``g_i`` (``B x d``) of the CD estimate of the loss gradient."""
        weight = (
            self.h[:, :, None] * self.v[:, None, :]
            - self.h_neg[:, :, None] * self.v_neg[:, None, :]
        )
        return -torch.cat([weight.flatten(1), self.v - self.v_neg, self.h - self.h_neg], 1)


class RBM(nn.Module):
    """A Bernoulli-Bernoulli restricted Boltzmann machine.

    Args:
        n_visible: the number of visible units.
        n_hidden: the number of hidden units.
        init_scale: standard deviation of the initial weights (biases start at 0).
        generator: the random source of the initial weights.

    Examples:
        >>> rbm = RBM(6, 3, generator=torch.Generator().manual_seed(0))
        >>> v = torch.bernoulli(torch.full((4, 6), 0.5))
        >>> rbm.log_likelihood(v).shape
        torch.Size([4])
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        *,
        init_scale: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_visible < 1 or n_hidden < 1:
            raise InputError(f"layer sizes must be >= 1, got {n_visible}, {n_hidden}")
        self.W = nn.Parameter(torch.randn(n_hidden, n_visible, generator=generator) * init_scale)
        self.b = nn.Parameter(torch.zeros(n_visible))
        self.c = nn.Parameter(torch.zeros(n_hidden))

    @property
    def n_visible(self) -> int:
        return self.W.shape[1]

    @property
    def n_hidden(self) -> int:
        return self.W.shape[0]

    # ------------------------------------------------------------------ conditionals

    def hidden_probs(self, v: Tensor) -> Tensor:
        """``P(h_j = 1 | v) = σ(c + W v)``, ``(B, n_hidden)``."""
        return torch.sigmoid(F.linear(v, self.W, self.c))

    def visible_probs(self, h: Tensor) -> Tensor:
        """``P(v_i = 1 | h) = σ(b + Wᵀ h)``, ``(B, n_visible)``."""
        return torch.sigmoid(F.linear(h, self.W.T, self.b))

    def free_energy(self, v: Tensor) -> Tensor:
        """``F(v) = −bᵀv − Σ_j softplus(c_j + W_j v)``, ``(B,)``."""
        return -v @ self.b - F.softplus(F.linear(v, self.W, self.c)).sum(1)

    def gibbs(self, v: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
        """``steps`` alternating Gibbs steps ``v → h → v``, starting from ``v``."""
        for _ in range(steps):
            h = torch.bernoulli(self.hidden_probs(v), generator=generator)
            v = torch.bernoulli(self.visible_probs(h), generator=generator)
        return v

    @torch.no_grad()
    def sample(self, n: int, steps: int = 1000, generator: torch.Generator | None = None) -> Tensor:
        """``n`` visible samples after ``steps`` Gibbs steps from uniform noise."""
        v = torch.bernoulli(
            torch.full((n, self.n_visible), 0.5, device=self.W.device), generator=generator
        )
        return self.gibbs(v, steps, generator)

    # ------------------------------------------------------------------ CD-k

    def positive_phase(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Phase 1: the data and ``P(h|v)``."""
        return v, self.hidden_probs(v)

    def negative_phase(
        self, start: Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Phase 2: ``k`` Gibbs steps from ``start`` (the data for CD, the persistent
        chains for PCD) to ``v'``, and ``P(h|v')``."""
        v_neg = self.gibbs(start, k, generator)
        return v_neg, self.hidden_probs(v_neg)

    @torch.no_grad()
    def cd_statistics(
        self,
        v: Tensor,
        k: int = 1,
        generator: torch.Generator | None = None,
        chains: Tensor | None = None,
    ) -> CDStatistics:
        """Phases 1 and 2 for a batch (PCD when ``chains``, the persistent chains, is given)."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        v, h = self.positive_phase(v)
        v_neg, h_neg = self.negative_phase(v if chains is None else chains, k, generator)
        return CDStatistics(v, h, v_neg, h_neg)

    @torch.no_grad()
    def weight_update(
        self,
        stats: CDStatistics,
        lr: float,
        *,
        inverse: Inverse | None = None,
        eps: EpsilonLike = "auto",
        eps_fraction: float | None = None,
        metric: Inverse | None = None,
        safety: float | None = None,
    ) -> DiffusionMatrix:
        """Phase 3: move along ``−ḡ`` (plain CD, ``inverse=None``), or along the
        diffusion-metric gradient of the CD estimate, ``−(I+εD)⁻¹ḡ`` (``inverse="exact"``)
        or ``−(I−εD)ḡ`` (``inverse="weak"``), ε by the policy ``eps``
        (:class:`~sgdgeom.epsilon.Epsilon`). Returns the batch's diffusion matrix of the CD
        gradients. ``metric=`` and ``safety=`` are the old names of ``inverse=`` and
        ``eps_fraction=``, kept for one release."""
        if metric is not None:
            warn(f"RBM.weight_update(metric={metric!r})", f"inverse={metric!r}")
            inverse = metric
        if safety is not None:
            warn("RBM.weight_update(safety=...)", "eps_fraction=...")
            eps_fraction = safety
        D = self.diffusion_matrix(stats)
        if inverse is None:
            step = D.mean_gradient()
        else:
            D.gram()
            step = DiffusionMetric(D, eps, eps_fraction).gradient(inverse_of(inverse))
        for p, s in zip(self.parameters(), D.space.unflatten(step).values(), strict=True):
            p.sub_(lr * s)
        return D

    def diffusion_matrix(self, stats: CDStatistics) -> DiffusionMatrix:
        """The diffusion matrix (F3) of the per-sample CD gradients of a batch."""
        rows = stats.per_sample_gradients()
        space = ParamSpace(self)
        return DiffusionMatrix.from_products(RowProducts(space, rows), rows.mean(0))

    # ------------------------------------------------------------------ likelihood

    def _check_enumerable(self) -> None:
        if self.n_hidden > ENUMERATION_LIMIT:
            raise InputError(
                f"exact partition function needs n_hidden <= {ENUMERATION_LIMIT}, got "
                f"{self.n_hidden}; use ais_log_partition()"
            )

    def _hidden_states(self, start: int, stop: int) -> Tensor:
        codes = torch.arange(start, stop, device=self.W.device)
        bits = (codes[:, None] >> torch.arange(self.n_hidden, device=self.W.device)) & 1
        return bits.to(self.W.dtype)

    def _hidden_log_weights(self, h: Tensor) -> Tensor:
        """``log Σ_v e^{-E(v,h)} = cᵀh + Σ_i softplus(b_i + (Wᵀh)_i)`` for each h."""
        return h @ self.c + F.softplus(F.linear(h, self.W.T, self.b)).sum(1)

    @torch.no_grad()
    def log_partition(self, chunk: int = 2**14) -> float:
        """``log Z`` exactly, by enumerating the ``2**n_hidden`` hidden states."""
        self._check_enumerable()
        parts = [
            torch.logsumexp(
                self._hidden_log_weights(
                    self._hidden_states(s, min(s + chunk, 2**self.n_hidden))
                ).double(),
                0,
            )
            for s in range(0, 2**self.n_hidden, chunk)
        ]
        return float(torch.logsumexp(torch.stack(parts), 0))

    @torch.no_grad()
    def log_likelihood(self, v: Tensor, log_z: float | None = None) -> Tensor:
        """``log p(v) = −F(v) − log Z`` per sample (exact ``log Z`` unless one is given)."""
        log_z = self.log_partition() if log_z is None else log_z
        return -self.free_energy(v).double() - log_z

    @torch.no_grad()
    def model_expectations(self) -> list[Tensor]:
        """``E_model[∂(−E)/∂θ]`` exactly by enumeration: ``[E h vᵀ, E v, E h]``."""
        self._check_enumerable()
        h = self._hidden_states(0, 2**self.n_hidden)
        log_w = self._hidden_log_weights(h).double()
        p = torch.softmax(log_w, 0).to(self.W.dtype)  # p(h)
        v_given_h = self.visible_probs(h)  # E[v|h]
        return [(p[:, None] * h).T @ v_given_h, p @ v_given_h, p @ h]

    def exact_gradient(self, data: Tensor) -> Tensor:
        """``∇G = −∇ mean log p(data)``, exactly (flat, in the parameter order)."""
        _, h = self.positive_phase(data)
        positive = [h.T @ data / len(data), data.mean(0), h.mean(0)]
        negative = self.model_expectations()
        return -torch.cat([(p - n).reshape(-1) for p, n in zip(positive, negative, strict=True)])

    @torch.no_grad()
    def ais_log_partition(
        self, chains: int = 100, betas: int = 1000, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """An annealed-importance-sampling estimate of ``log Z`` and its standard error
        (Salakhutdinov & Murray 2008), from the base RBM with ``W = 0`` and the same visible
        biases, through ``betas`` linearly spaced inverse temperatures."""
        schedule = torch.linspace(0, 1, betas, dtype=self.W.dtype, device=self.W.device)
        v = torch.bernoulli(torch.sigmoid(self.b).expand(chains, -1), generator=generator)

        def log_weight(v: Tensor, beta: Tensor) -> Tensor:
            """``−F_β(v)`` of ``p_β ∝ e^{bᵀv} Π_j (1 + e^{β(c_j + W_j v)})``."""
            return v @ self.b + F.softplus(beta * F.linear(v, self.W, self.c)).sum(1)

        log_w = torch.zeros(chains, dtype=torch.float64, device=self.W.device)
        for prev, beta in itertools.pairwise(schedule):
            log_w += (log_weight(v, beta) - log_weight(v, prev)).double()
            h = torch.bernoulli(
                torch.sigmoid(beta * F.linear(v, self.W, self.c)), generator=generator
            )
            v = torch.bernoulli(
                torch.sigmoid(beta * F.linear(h, self.W.T) + self.b), generator=generator
            )
        # log Z of the base: Σ_i softplus(b_i) + n_hidden log 2 (hidden units free at β = 0)
        log_z_base = float(F.softplus(self.b).sum()) + self.n_hidden * math.log(2)
        top = torch.logsumexp(log_w, 0) - math.log(chains)
        weights = torch.exp(log_w - log_w.max())
        se = float(weights.std() / weights.mean() / math.sqrt(chains))
        return log_z_base + float(top), se
