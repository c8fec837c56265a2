r"""Partial local entropy: PLA and PLEA, smoothing the loss along chosen layers (Musso §3-4).

With ``U`` the smoothed weights (whole layers by default; biases never, Musso footnote 15)
and :math:`\Delta W^a`, ``a = 1..y``, drawn afresh at every step uniformly in the box of
half-side R restricted to ``U``:

.. math::

    \mathcal L_{PLA}  &= \frac{1}{1+y}\Big[\mathcal L(W) + \sum_a \mathcal L(W+\Delta W^a)\Big]
    \quad (M23) \\
    \mathcal L_{PLEA} &= -\log \frac{1}{1+y}\Big[e^{-\mathcal L(W)} + \sum_a
    e^{-\mathcal L(W+\Delta W^a)}\Big] \quad (M22)

With a finite sharpness ``k`` the box indicator becomes the kernel
:math:`K_{R,k} = e^{-d_{R,k}}` (M5, M6), and the losses are the weighted forms (M19) and
(M14): :math:`\frac{1}{1+y}[\mathcal L(W) + \sum_a \mathcal L(W+\Delta W^a) K(\Delta W^a)]`
and :math:`-\log\frac{1}{1+y}[e^{-\mathcal L(W)} + \sum_a e^{-\mathcal L(W+\Delta W^a) -
d(\Delta W^a)}]`. The kernel is restricted to ``U`` (the product over the smoothed
coordinates only, M13).

With ``gamma`` instead of ``R`` the distance is the Gaussian one of (M11),
:math:`d(\gamma;\Delta W) = \gamma\|\Delta W\|_2^2` on ``U``: the displacements are drawn
from :math:`N(0, I_U/(2\gamma))`, whose density carries the factor
:math:`e^{-\gamma\|\Delta W\|^2}` as the uniform box carries the indicator (M8), so
(M22) and (M23) keep their form. As ``y → ∞`` the M-loss tends to the isotropic local free
entropy (M1) with β = 1 and (M1)'s γ equal to ``2 gamma``, restricted to ``U``.

.. warning::
    For a finite k the displacements are drawn uniformly in the larger box of half-side
    ``R + 5/k``, which covers the kernel's support: outside it each coordinate's kernel
    factor is below ``σ(−10) ≈ 4.5e-5``. As ``k → ∞`` it shrinks to the paper's box.

The loss is an ordinary differentiable tensor: the perturbations are constants added to
the weights inside the forward pass (the weights themselves are never modified), so
``loss.backward()`` gives the average of the gradients at the sampled points (PLA) or
their softmax-weighted average (PLEA), and y does not scale the learning rate.

Routes:

- ``"naive"``: y+1 forward passes of the whole model (``torch.func.functional_call``).
- ``"prefix"``: the layers before the first smoothed one run once; from there the y+1
  branches run as one batch of ``(y+1) B`` rows, each smoothed Linear multiplying its
  branch by its own perturbed weight. The prefix's backward runs once, on the sum of the
  branches' gradients at the branch point.
- ``"split"`` (PLA only): the minibatch is cut into y+1 chunks (:func:`split_sizes`),
  chunk ``a`` seeing the weights ``W + ΔW^a`` (chunk 0 unperturbed). It is unbiased for
  the same objective, since each chunk's mean loss is unbiased for its point's loss, and
  costs one step's multiplies plus drawing the y perturbations, but its variance is
  higher: each point sees 1/(y+1) of the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.params import ParamSpace
from sgdgeom.persample import CoverageError, LossSpec, per_sample_loss, plan_layers, rule_for
from sgdgeom.persample.capture import coverage_failures, describe
from sgdgeom.persample.layers.linear import LinearRule

__all__ = [
    "PartialLocalEntropy",
    "gaussian_local_entropy",
    "kernel_distance",
    "split_sizes",
    "local_free_entropy",
    "m_loss",
]

KERNEL_MARGIN = 5.0  # the sampling box for finite k has half-side R + KERNEL_MARGIN / k


def kernel_distance(delta: Tensor, R: float, k: float) -> Tensor:
    r"""``d_{R,k}(ΔW)`` (M5) summed over the coordinates of ``delta`` (any shape, a leading
    batch dimension kept): :math:`-\sum_i [\log(1-\sigma(2k(\Delta_i - R))) +
    \log\sigma(2k(\Delta_i + R))]`, computed with ``logsigmoid``. ``K = exp(-d)`` (M6)."""
    inside = F.logsigmoid(-2 * k * (delta - R)) + F.logsigmoid(2 * k * (delta + R))
    return -inside.flatten(1).sum(1)


def _half_side(R: float, k: float | None) -> float:
    return R if k is None else R + KERNEL_MARGIN / k


class PartialLocalEntropy:
    """One training step's PLA or PLEA loss for a model, smoothing only chosen weights.

    Args:
        model: the network.
        base_loss: the loss being smoothed: ``"cross_entropy"``, ``"mse"``, a loss module or
            a per-sample function (its batch mean is L).
        layers: names of the layers whose weights are smoothed, or ``"all"``.
        mask: instead of (or on top of) ``layers``, ``{weight name: bool tensor}`` selecting
            individual weights, for finer anisotropy.
        R: half-side of the sampling box (Musso's R).
        gamma: instead of R, the Gaussian distance ``γ‖ΔW‖²`` of (M11): displacements
            drawn from ``N(0, 1/(2γ))`` on each smoothed weight.
        y: number of perturbed points (y = 0 gives the base loss, M4).
        kind: ``"pla"`` (M23; M19 with finite k) or ``"plea"`` (M22; M14 with finite k).
        k: kernel sharpness (M5); None is the box limit ``k → ∞``.
        route: ``"auto"`` (``"prefix"`` when every smoothed module is a Linear, else
            ``"naive"``), ``"naive"``, ``"prefix"`` or ``"split"`` (PLA only).
        generator: the random source of the displacements (on the weights' device); None
            uses torch's global generator, which :class:`~sgdgeom.train.Trainer` seeds every
            epoch. Under DDP give every rank the same seed: all ranks then draw the same
            perturbations and the averaged gradient is the PLA gradient of the global batch.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> pla = PartialLocalEntropy(model, layers=["2"], R=0.01, y=4,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> loss = pla(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> loss.backward()  # .grad: the mean of the gradients at the 5 points
    """

    def __init__(
        self,
        model: nn.Module,
        base_loss: LossSpec = "cross_entropy",
        layers: Sequence[str] | str = "all",
        *,
        R: float | None = None,
        gamma: float | None = None,
        y: int = 4,
        kind: str = "pla",
        k: float | None = None,
        mask: dict[str, Tensor] | None = None,
        route: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        if (R is None) == (gamma is None):
            raise InputError(
                "give exactly one of R (the box, M22/M23) and gamma (the Gaussian distance, M11)"
            )
        for name, value in (("R", R), ("gamma", gamma)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0, got {value}")
        if y < 0:
            raise InputError(f"y must be >= 0, got {y}")
        if kind not in ("pla", "plea"):
            raise InputError(
                f"kind must be 'pla' or 'plea' (finite k gives the kernel forms "
                f"M19, M14), got {kind!r}"
            )
        if k is not None and not k > 0:
            raise InputError(f"k must be > 0 or None (the box limit), got {k}")
        if k is not None and gamma is not None:
            raise InputError("k sharpens the box kernel (M5); the Gaussian distance has none")
        self.model, self.R, self.gamma, self.y, self.kind, self.k = model, R, gamma, y, kind, k
        self.loss = per_sample_loss(base_loss)
        self.generator = generator
        self.masks = self._select(layers, mask or {})
        modules = dict(model.named_modules())
        self.smoothed = {name: modules[name.rpartition(".")[0]] for name in self.masks}
        self._route = self._choose_route(route)

    # ------------------------------------------------------------------ selection

    def _select(
        self, layers: Sequence[str] | str, mask: dict[str, Tensor]
    ) -> dict[str, Tensor | None]:
        """``{weight name: None (whole tensor) or bool mask}`` of what is smoothed."""
        params = dict(self.model.named_parameters())
        weights = {
            n.rpartition(".")[0]: n
            for n, p in params.items()
            if n.rpartition(".")[2] == "weight" and p.dim() >= 2
        }
        if layers == "all":
            chosen = list(weights) if not mask else []
        elif isinstance(layers, str):
            raise InputError(f"layers must be 'all' or a list of layer names, got {layers!r}")
        else:
            chosen = list(layers)
        unknown = [n for n in chosen if n not in weights]
        if unknown:
            raise InputError(
                f"no weight layers named {unknown}; the model's are {', '.join(weights)}"
            )
        selected: dict[str, Tensor | None] = {weights[n]: None for n in chosen}
        for name, m in mask.items():
            if name not in params:
                raise InputError(f"mask names unknown parameter {name!r}")
            if name.rpartition(".")[2] == "bias":
                raise InputError(
                    f"{name!r} is a bias: biases are never smoothed (Musso, footnote 15)"
                )
            if m.shape != params[name].shape or m.dtype != torch.bool:
                raise InputError(
                    f"mask for {name!r} must be a bool tensor of shape {tuple(params[name].shape)}"
                )
            selected[name] = m if selected.get(name, m) is not None else None
        if not selected:
            raise InputError("nothing to smooth: name some layers or give a mask")
        return selected

    def _choose_route(self, route: str) -> str:
        if route not in ("auto", "naive", "prefix", "split"):
            raise InputError(f"route must be auto, naive, prefix or split, got {route!r}")
        if route == "split" and self.kind != "pla":
            raise InputError("the split-batch estimator is for PLA only")
        # the layer registry decides where a branch can open: modules that its Linear rule
        # serves (a subclass that changes the forward is not one)
        others = [n for n, m in self.smoothed.items() if not isinstance(rule_for(m), LinearRule)]
        if route in ("prefix", "split") and others:
            raise UnsupportedModelError(
                f"the {route} route branches at Linear layers only, and {others} are not "
                f"(by the layer registry); use route='naive'"
            )
        self._batched_ok = not others
        self._coverage_checked = route == "naive"
        return route

    def _check_branching(self, x: Tensor, target: Tensor) -> None:
        """Once, on a few samples: the batched routes perturb a smoothed weight inside its
        Linear's forward only, so each must be used there only (not tied elsewhere). Where
        one is not, ``"auto"`` takes the naive route (exact), and an explicit batched route
        raises, naming the weight."""
        self._coverage_checked = True
        model = self.model.module if hasattr(self.model, "module") else self.model
        try:
            space = ParamSpace(model)
            failures = coverage_failures(
                model, plan_layers(model, space), space, self.loss, x[:8], target[:8]
            )
        except CoverageError as err:  # a weight shared between modules
            if self._route == "auto":
                self._batched_ok = False
                return
            raise UnsupportedModelError(f"{err}; use route='naive'") from None
        prefix = "module." if model is not self.model else ""
        smoothed = {n: e for n, e in failures.items() if prefix + n in self.masks}
        if not smoothed:
            return
        if self._route == "auto":
            self._batched_ok = False
            return
        raise UnsupportedModelError(
            f"the {self._route} route perturbs {describe(smoothed)} inside its Linear only, but "
            f"it is also used outside that module (tied weights?); use route='naive'"
        )

    @property
    def route(self) -> str:
        """The route the next call takes. ``"auto"`` falls back to ``"naive"`` while a
        BatchNorm is in train mode: in one batch of (y+1) B rows its statistics would mix
        the branches."""
        batch_stats = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for m in self.model.modules()
        )
        if self._route == "auto":
            return "prefix" if self._batched_ok and not batch_stats else "naive"
        if self._route != "naive" and batch_stats:
            raise UnsupportedModelError(
                f"a BatchNorm in train mode would mix the branches of the {self._route} "
                f"route; use route='naive' (or 'auto'), or model.eval()"
            )
        return self._route

    # ------------------------------------------------------------------ sampling

    def sample(self, points: int | None = None) -> dict[str, Tensor]:
        """Displacements ``{weight name: (points, *shape)}`` on the smoothed coordinates,
        zero elsewhere: uniform in the box (of half-side ``R + 5/k`` for a finite k), or
        ``N(0, 1/(2γ))`` for the Gaussian distance (M11)."""
        points = self.y if points is None else points
        params = dict(self.model.named_parameters())
        out = {}
        for name, m in self.masks.items():
            p = params[name]
            device = self.generator.device if self.generator is not None else p.device
            delta = torch.empty((points, *p.shape), dtype=p.dtype, device=device)
            if self.gamma is None:
                half = _half_side(self.R, self.k)
                delta = delta.uniform_(-half, half, generator=self.generator)
            else:
                delta = delta.normal_(0.0, (2 * self.gamma) ** -0.5, generator=self.generator)
            delta = delta.to(p.device)
            out[name] = delta if m is None else delta * m
        return out

    def _distances(self, deltas: dict[str, Tensor]) -> Tensor | None:
        """``d_{R,k}`` of each of the y displacements over the smoothed coordinates."""
        if self.k is None:
            return None
        total = None
        for name, m in self.masks.items():
            delta = deltas[name] if m is None else deltas[name][:, m]
            d = kernel_distance(delta, self.R, self.k)
            total = d if total is None else total + d
        return total

    # ------------------------------------------------------------------ the loss

    def combine(self, losses: Tensor, distances: Tensor | None) -> Tensor:
        """The smoothed loss from the y+1 point losses ``[L(W), L(W+ΔW^1), ...]``."""
        if self.kind == "pla":
            if distances is None:
                return losses.mean()
            weights = torch.cat([losses.new_ones(1), torch.exp(-distances)])
            return (losses * weights).sum() / len(losses)
        exponents = -losses
        if distances is not None:
            exponents = exponents - torch.cat([losses.new_zeros(1), distances])
        return math.log(len(losses)) - torch.logsumexp(exponents, 0)

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        """The smoothed loss of one minibatch, with its graph (call ``.backward()``)."""
        return self.objective(self.model, x, target)[0]

    def objective(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, logits)`` for :class:`~sgdgeom.train.Trainer`; the logits are those at
        the unperturbed weights (for ``"split"``, each chunk's at its own point)."""
        if model is not self.model:
            raise InputError("this PartialLocalEntropy was built for another model")
        route = self.route
        first = route != "naive" and not self._coverage_checked
        if first:
            self._check_branching(x, target)
            route = self.route
        deltas = self.sample()
        distances = self._distances(deltas)
        if route == "naive":
            losses, logits = self._naive(x, target, deltas)
        elif first:
            losses, logits = self._first_batched(x, target, deltas)
        else:
            losses, logits = self._batched(x, target, deltas)
        return self.combine(losses, distances), logits

    def _first_batched(
        self, x: Tensor, target: Tensor, deltas: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The first batched pass: a model whose layers after the branch point cannot take
        the branched rows (a skip connection around a smoothed Linear adds B unbranched rows
        to (y+1)·B branched ones) fails here, and ``"auto"`` takes the naive route."""
        try:
            return self._batched(x, target, deltas)
        except RuntimeError as err:
            if self._route != "auto":
                raise UnsupportedModelError(
                    f"the {self._route} route failed on this model ({err}): every layer after "
                    f"the first smoothed one must take the branched rows, which a skip "
                    f"connection around a smoothed layer does not; use route='naive'"
                ) from err
            self._batched_ok = False
            return self._naive(x, target, deltas)

    def _naive(self, x: Tensor, target: Tensor, deltas: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        losses = [self.loss(logits, target).mean()]
        buffers = dict(self.model.named_buffers())
        for a in range(self.y):
            params = {
                n: p + deltas[n][a] if n in deltas else p for n, p in self.model.named_parameters()
            }
            # perturbed passes leave BatchNorm's running statistics alone
            frozen = {n: b.clone() for n, b in buffers.items()}
            out = functional_call(self.model, {**params, **frozen}, (x,))
            losses.append(self.loss(out, target).mean())
        return torch.stack(losses), logits

    def _batched(
        self, x: Tensor, target: Tensor, deltas: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        branches = self.y + 1
        sizes = split_sizes(len(x), self.y) if self.route == "split" else None
        with self._branched_layers(deltas, sizes):
            out = self.model(x)
        if sizes is None:  # prefix: (y+1) B rows, branch-major
            per_branch = out.reshape(branches, len(x), *out.shape[1:])
            losses = torch.stack([self.loss(o, target).mean() for o in per_branch])
            return losses, per_branch[0]
        rows = self.loss(out, target)  # one call for every chunk, then each chunk's mean
        head = rows[: sizes[0]].mean()[None]
        return torch.cat([head, rows[sizes[0] :].reshape(self.y, -1).mean(1)]), out

    @contextlib.contextmanager
    def _branched_layers(
        self, deltas: dict[str, Tensor], sizes: list[int] | None
    ) -> Iterator[None]:
        """Within the block, each smoothed Linear computes every branch with its own weight;
        the first one called opens the branches (prefix: repeats its input y+1 times by
        broadcasting; split: cuts the batch into chunks)."""
        state = {"open": False}
        originals = {}

        def make_forward(module: nn.Linear, name: str) -> Callable[[Tensor], Tensor]:
            delta = deltas[name]  # (y, out, in), constants

            def forward(h: Tensor) -> Tensor:
                if sizes is not None:  # split: chunk a sees W + ΔW^a (chunk 0: W)
                    state["open"] = True
                    return _split_linear(h, module, delta, sizes)
                # W h once for all branches, then each branch adds its own ΔW^a h; at the
                # branch point h is shared, so the weight gradient is one product.
                base = F.linear(h, module.weight, module.bias)
                if not state["open"]:  # the branch point: one input, y+1 weights
                    state["open"] = True
                    shifts = torch.einsum("b...i,aoi->ab...o", h, delta)
                    out = torch.cat([base[None], base[None] + shifts])
                else:  # already branched: rows are (y+1) blocks of B, branch-major
                    h = h.reshape(len(delta) + 1, -1, *h.shape[1:])
                    base = base.reshape(len(delta) + 1, -1, *base.shape[1:])
                    shifts = torch.einsum("ab...i,aoi->ab...o", h[1:], delta)
                    out = torch.cat([base[:1], base[1:] + shifts])
                return out.reshape(-1, *out.shape[2:])

            return forward

        try:
            for name, module in self.smoothed.items():
                originals[module] = module.__dict__.get("forward")
                module.forward = make_forward(module, name)
            yield
        finally:
            for module, original in originals.items():
                if original is None:
                    del module.forward
                else:
                    module.forward = original
        if not state["open"]:
            raise RuntimeError("no smoothed layer was called in the forward pass")


def _batched_split(h: Tensor) -> bool:
    """Whether the split route runs its y equal chunks as one batched product: on an
    accelerator, where a small step is launch-bound; on the CPU a loop of y products is
    faster than ``bmm``."""
    return h.device.type != "cpu"


def _split_linear(h: Tensor, module: nn.Linear, delta: Tensor, sizes: list[int]) -> Tensor:
    """The split route through one smoothed Linear: rows of chunk a times ``W + ΔW^a``
    (chunk 0 times W). ``h``: ``(B, ..., in)``, ``delta``: ``(y, out, in)``."""
    head, rest = h[: sizes[0]], h[sizes[0] :]
    out = [F.linear(head, module.weight, module.bias)]
    if _batched_split(h):
        weights = (module.weight + delta).transpose(1, 2)  # (y, in, out)
        chunks = rest.reshape(len(delta), -1, h.shape[-1])
        if module.bias is None:
            batched = torch.bmm(chunks, weights)
        else:
            batched = torch.baddbmm(module.bias, chunks, weights)
        out.append(batched.reshape(-1, *out[0].shape[1:]))
    else:
        out += [
            F.linear(chunk, module.weight + d, module.bias)
            for chunk, d in zip(torch.split(rest, sizes[1:]), delta, strict=True)
        ]
    return torch.cat(out)


def split_sizes(batch: int, y: int) -> list[int]:
    """The chunks of the split route: y chunks of ``s = batch // (y+1)`` rows for the
    perturbed points, the first ``batch − y s`` rows (at least ``s``) for W itself."""
    if batch < y + 1:
        raise InputError(
            f"the split route needs at least y+1 = {y + 1} samples per batch, got {batch}"
        )
    size = batch // (y + 1)
    return [batch - y * size] + [size] * y


# --------------------------------------------------------------------------- estimators


def _log_mean_exp(values: Tensor) -> tuple[float, float]:
    """``log mean exp(values)`` and its standard error (delta method)."""
    n = len(values)
    m = values.max()
    w = torch.exp(values - m)
    mean = w.mean()
    se = w.std() / math.sqrt(n) if n > 1 else torch.tensor(float("nan"))
    return float(m + mean.log()), float(se / mean)


def _variant(ple: PartialLocalEntropy, **changes: Any) -> PartialLocalEntropy:
    """A shallow copy with some settings changed (same model, masks and generator)."""
    clone = object.__new__(PartialLocalEntropy)
    clone.__dict__.update(ple.__dict__)
    clone.__dict__.update(changes)
    return clone


def _full_batch_route(ple: PartialLocalEntropy) -> str:
    """Estimators evaluate every point on the whole batch: never the split route."""
    return "naive" if ple.route == "naive" else "prefix"


def _point_losses(
    ple: PartialLocalEntropy, x: Tensor, target: Tensor, deltas: dict[str, Tensor], chunk: int
) -> Tensor:
    """The mean loss at each perturbed point ``W + deltas[a]`` (no gradient)."""
    route = _full_batch_route(ple)
    points = len(next(iter(deltas.values())))
    values = []
    with torch.no_grad():
        for start in range(0, points, chunk):
            part = {n: d[start : start + chunk] for n, d in deltas.items()}
            view = _variant(ple, y=len(next(iter(part.values()))), _route=route)
            losses, _ = (view._naive if route == "naive" else view._batched)(x, target, part)
            values.append(losses[1:])
    return torch.cat(values)


def m_loss(
    ple: PartialLocalEntropy, x: Tensor, target: Tensor, repeats: int = 32
) -> tuple[float, float]:
    """The M-loss (M3, restricted to U: M14) at the current weights, averaged over
    ``repeats`` independent draws of its y displacements, and its standard error."""
    view = _variant(ple, kind="plea", _route=_full_batch_route(ple))
    with torch.no_grad():
        values = torch.tensor([float(view(x, target)) for _ in range(repeats)], dtype=torch.float64)
    se = float(values.std() / math.sqrt(repeats)) if repeats > 1 else math.nan
    return float(values.mean()), se


def local_free_entropy(
    ple: PartialLocalEntropy, x: Tensor, target: Tensor, samples: int = 256, chunk: int = 16
) -> tuple[float, float]:
    r"""The partial local free entropy :math:`\mathcal F^{[U]}(R,k;W)` (M16; M18 for the box
    limit) by Monte Carlo over ``samples`` displacements, with its standard error.

    :math:`\mathcal F = -\log \int_U e^{-\mathcal L(W+\Delta)} K(\Delta)\, d\Delta = -\log
    \mathrm{Vol} - \log \mathbb E_{\Delta \sim \mathrm{box}}[e^{-\mathcal L(W+\Delta) -
    d(\Delta)}]`. The constant :math:`-\log \mathrm{Vol}` of the sampling box (``N_U``
    times ``log 2R'``) is left out: differences between weights, layers or runs are what
    probe the shape of a minimum. With the Gaussian distance (M11) the kernel is
    :math:`e^{-\gamma\|\Delta\|^2}` and the constant left out is
    :math:`-\frac{N_U}{2}\log\frac{\pi}{\gamma}`.
    """
    deltas = ple.sample(samples)
    losses = _point_losses(ple, x, target, deltas, chunk)
    distances = ple._distances(deltas)
    exponents = -losses if distances is None else -losses - distances
    value, se = _log_mean_exp(exponents.double())
    return -value, se


def gaussian_local_entropy(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    gamma: float,
    beta: float = 1.0,
    base_loss: LossSpec = "cross_entropy",
    samples: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    r"""The isotropic local free entropy (M1) by Monte Carlo, with its standard error:

    :math:`\mathcal F(\beta,\gamma;W) = -\log\int dW' e^{-\beta\mathcal L(W') -
    \frac\gamma2\|W-W'\|^2} = -\frac d2 \log\frac{2\pi}{\gamma} - \log \mathbb E_{\Delta
    \sim N(0, I/\gamma)}[e^{-\beta \mathcal L(W+\Delta)}]`, the constant left out. All
    trainable parameters are perturbed (the isotropic case).
    """
    if gamma <= 0:
        raise InputError(f"gamma must be > 0, got {gamma}")
    loss = per_sample_loss(base_loss)
    params = dict(model.named_parameters())
    exponents = []
    with torch.no_grad():
        for _ in range(samples):
            shifted = {
                n: p
                + torch.randn(
                    p.shape,
                    generator=generator,
                    dtype=p.dtype,
                    device=generator.device if generator else p.device,
                ).to(p.device)
                / math.sqrt(gamma)
                for n, p in params.items()
            }
            out = functional_call(model, shifted, (x,))
            exponents.append(-beta * loss(out, target).mean())
    value, se = _log_mean_exp(torch.stack(exponents).double())
    return -value, se
