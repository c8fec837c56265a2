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

How the y+1 points are batched (``batching``; "route" in sgdgeom names only how per-sample
products are computed):

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
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from sgdgeom._deprecated import warn
from sgdgeom.errors import InputError, UnsupportedModelError
from sgdgeom.optim.objectives import LossOptions, Objective, register_loss
from sgdgeom.optim.perturbations import draw_key, point_key, uniform_
from sgdgeom.params import ParamSpace
from sgdgeom.persample import CoverageError, LossSpec, per_sample_loss, plan_layers, rule_for
from sgdgeom.persample.capture import coverage_failures, describe
from sgdgeom.persample.layers.linear import LinearRule
from sgdgeom.precision import compute_dtype, full_precision

__all__ = [
    "BATCHINGS",
    "Batching",
    "PLAOptions",
    "PLEAOptions",
    "PartialLocalEntropy",
    "gaussian_local_entropy",
    "kernel_distance",
    "split_sizes",
    "local_free_entropy",
    "m_loss",
]

Batching = Literal["auto", "naive", "prefix", "split"]
"""How the y+1 points of a step are batched (the module docstring)."""
BATCHINGS: tuple[str, ...] = get_args(Batching)

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
        batching: ``"auto"`` (``"prefix"`` when every smoothed module is a Linear, else
            ``"naive"``), ``"naive"``, ``"prefix"`` or ``"split"`` (PLA only); see the
            module docstring. ``route=`` is its old name, kept for one release.
        generator: the random source of the displacements; None uses torch's global
            generator, which :class:`~sgdgeom.train.Trainer` seeds every epoch. Each step
            takes one 64-bit key from it, and the box displacements are a pure function of
            that key (:mod:`~sgdgeom.optim.perturbations`, filled on every core, the same
            bits on every device). Under DDP give every rank the same seed: all ranks then
            draw the same perturbations and the averaged gradient is the PLA gradient of the
            global batch.
        antithetic: draw y/2 displacements and use each with both signs, ``±ΔW`` (y must be
            even). Each displacement is still uniform in the box, so the loss and its
            gradient stay unbiased for (M23)'s expectation, but the odd part of the loss
            around W cancels within a pair: the linear term, and with it most of the
            gradient noise that the smoothing adds (on a quadratic loss the PLA gradient
            becomes exactly ∇L(W)). A variance-reduction option that changes the noise of
            training, not the objective.
        compile: draw the box displacements with the counter-based arithmetic compiled by
            ``torch.compile`` (one kernel per layer on a GPU in place of about fifteen; the
            same bits) where the CPU's numba kernel does not serve. The first step of each
            shape compiles (seconds).

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
        kind: Literal["pla", "plea"] = "pla",
        k: float | None = None,
        mask: dict[str, Tensor] | None = None,
        batching: Batching = "auto",
        generator: torch.Generator | None = None,
        antithetic: bool = False,
        compile: bool = False,
        route: Batching | None = None,
    ) -> None:
        if route is not None:
            warn(f"PartialLocalEntropy(route={route!r})", f"batching={route!r}")
            batching = route
        if (R is None) == (gamma is None):
            raise InputError(
                "give exactly one of R (the box, M22/M23) and gamma (the Gaussian distance, M11)"
            )
        for name, value in (("R", R), ("gamma", gamma)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0, got {value}")
        if y < 0:
            raise InputError(f"y must be >= 0, got {y}")
        if antithetic and y % 2:
            raise InputError(
                f"antithetic=True pairs the y displacements as ±ΔW: y must be even, got {y}"
            )
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
        self.generator, self.antithetic, self.compile = generator, antithetic, compile
        self.masks = self._select(layers, mask or {})
        modules = dict(model.named_modules())
        self.smoothed = {name: modules[name.rpartition(".")[0]] for name in self.masks}
        self._batching = self._choose_batching(batching)

    # ------------------------------------------------------------------ selection

    def _select(
        self, layers: Sequence[str] | str, mask: dict[str, Tensor]
    ) -> dict[str, Tensor | None]:
        """``{weight name: None (whole tensor) or bool mask}`` of what is smoothed."""
        params = dict(self.model.named_parameters())
        weights: dict[str, list[str]] = {}  # layer -> its weights (Musso's, M2)
        for n, p in params.items():
            if not ParamSpace.is_bias(n) and p.dim() >= 2:
                weights.setdefault(n.rpartition(".")[0], []).append(n)
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
        selected: dict[str, Tensor | None] = {w: None for n in chosen for w in weights[n]}
        for name, m in mask.items():
            if name not in params:
                raise InputError(f"mask names unknown parameter {name!r}")
            if ParamSpace.is_bias(name):
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

    def _choose_batching(self, batching: str) -> str:
        if batching not in BATCHINGS:
            raise InputError(f"batching must be auto, naive, prefix or split, got {batching!r}")
        if batching == "split" and self.kind != "pla":
            raise InputError("the split-batch estimator is for PLA only")
        # the layer registry decides where a branch can open: modules that its Linear rule
        # serves (a subclass that changes the forward is not one)
        others = [n for n, m in self.smoothed.items() if not isinstance(rule_for(m), LinearRule)]
        if batching in ("prefix", "split") and others:
            raise UnsupportedModelError(
                f"the {batching} batching branches at Linear layers only, and {others} are not "
                f"(by the layer registry); use batching='naive'"
            )
        self._batched_ok = not others
        self._coverage_checked = batching == "naive"
        return batching

    def _check_branching(self, x: Tensor, target: Tensor) -> None:
        """Once, on a few samples: the batched forms perturb a smoothed weight inside its
        Linear's forward only, so each must be used there only (not tied elsewhere). Where
        one is not, ``"auto"`` takes the naive batching (exact), and an explicit batched one
        raises, naming the weight."""
        self._coverage_checked = True
        inner = getattr(self.model, "module", None)  # a DDP wrapper's model
        model = inner if isinstance(inner, nn.Module) else self.model
        try:
            space = ParamSpace(model)
            layers = plan_layers(model, space)
            failures = coverage_failures(model, layers, space, self.loss, x[:8], target[:8])
        except CoverageError as err:  # a parameter of no module
            if self._batching == "auto":
                self._batched_ok = False
                return
            raise UnsupportedModelError(f"{err}; use batching='naive'") from None
        # a weight shared between modules (a tied head) is exact for D, not for a branch
        # that perturbs it in one of them
        shared = {layer.space_name(n) for layer in layers for n in layer.shared}
        failures.update({n: float("nan") for n in shared if n not in failures})
        prefix = "module." if model is not self.model else ""
        smoothed = {n: e for n, e in failures.items() if prefix + n in self.masks}
        if not smoothed:
            return
        if self._batching == "auto":
            self._batched_ok = False
            return
        raise UnsupportedModelError(
            f"the {self._batching} batching perturbs {describe(smoothed)} inside its Linear "
            f"only, but it is also used outside that module (tied weights, or a function of "
            f"the weight); use batching='naive'"
        )

    @property
    def route(self) -> str:
        """Deprecated: :attr:`batching`."""
        warn("PartialLocalEntropy.route", "PartialLocalEntropy.batching")
        return self.batching

    @property
    def batching(self) -> str:
        """The batching the next call takes. ``"auto"`` falls back to ``"naive"`` while a
        BatchNorm is in train mode: in one batch of (y+1) B rows its statistics would mix
        the branches."""
        batch_stats = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for m in self.model.modules()
        )
        if self._batching == "auto":
            return "prefix" if self._batched_ok and not batch_stats else "naive"
        if self._batching != "naive" and batch_stats:
            raise UnsupportedModelError(
                f"a BatchNorm in train mode would mix the branches of the {self._batching} "
                f"batching; use batching='naive' (or 'auto'), or model.eval()"
            )
        return self._batching

    # ------------------------------------------------------------------ sampling

    def sample(self, points: int | None = None) -> dict[str, Tensor]:
        """Displacements ``{weight name: (points, *shape)}`` on the smoothed coordinates,
        zero elsewhere: uniform in the box (of half-side ``R + 5/k`` for a finite k) from the
        counter-based source of :mod:`~sgdgeom.optim.perturbations`, keyed by one draw of
        the generator, or ``N(0, 1/(2γ))`` for the Gaussian distance (M11). With
        ``antithetic``, the second half of the points is the negation of the first."""
        return self._draw(self._new_key(), points)

    def _new_key(self) -> int | None:
        """The step's key for the box's counter-based source (None for the Gaussian)."""
        return draw_key(self.generator) if self.gamma is None else None

    def _draw(
        self, key: int | None, points: int | None = None, shifted: bool = False
    ) -> dict[str, Tensor]:
        """The displacements ``ΔW`` of :meth:`sample` under ``key`` or, with ``shifted``,
        the perturbed weights ``W + ΔW`` (constants), as adding them gives."""
        points = self.y if points is None else points
        if self.antithetic and points % 2:
            raise InputError(f"antithetic pairs need an even number of points, got {points}")
        fresh = points // 2 if self.antithetic else points
        signs = [1] * fresh + [-1] * (points - fresh)
        params = dict(self.model.named_parameters())
        out = {}
        for stream, (name, m) in enumerate(self.masks.items()):
            weight = params[name].detach()
            dtype = compute_dtype(weight.dtype)  # bfloat16 weights: drawn in float32
            delta = torch.empty((points, *weight.shape), dtype=dtype, device=weight.device)
            if key is not None:
                keys = [point_key(key, stream, a) for a in range(fresh)] * (1 + self.antithetic)
                fused = shifted and m is None and dtype == weight.dtype  # W + ΔW in one pass
                base = weight if fused else None
                assert self.R is not None  # the box (a Gaussian draws below)
                uniform_(
                    delta,
                    keys,
                    _half_side(self.R, self.k),
                    signs=signs,
                    base=base,
                    compiled=self.compile,
                )
                if fused:
                    out[name] = delta
                    continue
            else:  # the generator's own normal draw, on its device
                device = self.generator.device if self.generator is not None else weight.device
                normal = torch.empty((fresh, *weight.shape), dtype=dtype, device=device)
                assert self.gamma is not None  # the Gaussian distance (M11)
                delta[:fresh] = normal.normal_(
                    0.0, (2 * self.gamma) ** -0.5, generator=self.generator
                )
                torch.neg(delta[:fresh], out=delta[fresh:])
            delta = delta if m is None else delta * m
            out[name] = (weight + delta).to(weight.dtype) if shifted else delta
        return out

    def _shift(self, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        """The perturbed weights ``W + ΔW`` (constants) of the displacements, in the
        weights' dtype."""
        params = dict(self.model.named_parameters())
        return {
            name: (params[name].detach() + delta).to(params[name].dtype)
            for name, delta in deltas.items()
        }

    def _distances(self, deltas: dict[str, Tensor]) -> Tensor | None:
        """``d_{R,k}`` of each of the y displacements over the smoothed coordinates."""
        if self.k is None or self.R is None:
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
        if self.y == 0:  # no perturbed point: the base loss (M4), whatever the batching
            logits = model(x)
            return self.loss(logits, target).mean(), logits
        batching = self.batching
        first = batching != "naive" and not self._coverage_checked
        if first:
            self._check_branching(x, target)
            batching = self.batching
        if batching == "naive":
            deltas = self.sample()
            distances = self._distances(deltas)
            losses, logits = self._naive(x, target, deltas)
            return self.combine(losses, distances), logits
        key = self._new_key()
        if key is None:  # Gaussian: one normal draw, then W + ΔW
            gaussian = self._draw(None)
            weights = self._shift(gaussian)

            def displacements() -> dict[str, Tensor]:
                return gaussian

        else:  # the box: W + ΔW in one pass; ΔW only for a finite k's kernel (or a fallback)
            weights = self._draw(key, shifted=True)

            def displacements() -> dict[str, Tensor]:
                return self._draw(key)

        distances = self._distances(displacements()) if self.k is not None else None
        if first:
            losses, logits = self._first_batched(x, target, weights, displacements)
        else:
            losses, logits = self._batched(x, target, weights)
        return self.combine(losses, distances), logits

    def _first_batched(
        self,
        x: Tensor,
        target: Tensor,
        weights: dict[str, Tensor],
        displacements: Callable[[], dict[str, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """The first batched pass: a model whose layers after the branch point cannot take
        the branched rows (a skip connection around a smoothed Linear adds B unbranched rows
        to (y+1)·B branched ones) fails here, and ``"auto"`` takes the naive batching with
        the same displacements."""
        try:
            return self._batched(x, target, weights)
        except RuntimeError as err:
            if self._batching != "auto":
                raise UnsupportedModelError(
                    f"the {self._batching} batching failed on this model ({err}): every layer "
                    f"after the first smoothed one must take the branched rows, which a skip "
                    f"connection around a smoothed layer does not; use batching='naive'"
                ) from err
            self._batched_ok = False
            return self._naive(x, target, displacements())

    def _naive(self, x: Tensor, target: Tensor, deltas: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        losses = [self.loss(logits, target).mean()]
        buffers = dict(self.model.named_buffers())
        for a in range(self.y):
            params = {  # W + ΔW in the weights' dtype (ΔW is float32 for bfloat16 weights)
                n: (p + deltas[n][a]).to(p.dtype) if n in deltas else p
                for n, p in self.model.named_parameters()
            }
            # perturbed passes leave BatchNorm's running statistics alone
            frozen = {n: b.clone() for n, b in buffers.items()}
            out = functional_call(self.model, {**params, **frozen}, (x,))
            losses.append(self.loss(out, target).mean())
        return torch.stack(losses), logits

    def _batched(
        self, x: Tensor, target: Tensor, weights: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The prefix or split batching, with the perturbed weights ``W + ΔW^a``
        (constants)."""
        branches = self.y + 1
        sizes = split_sizes(len(x), self.y) if self.batching == "split" else None
        with self._branched_layers(weights, sizes):
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
        self, weights: dict[str, Tensor], sizes: list[int] | None
    ) -> Iterator[None]:
        """Within the block, each smoothed Linear computes every branch with its own weight;
        the first one called opens the branches (prefix: its input shared by y+1 weights;
        split: cuts the batch into chunks)."""
        state: dict[str, Any] = {"open": False}
        originals = {}

        def make_forward(module: nn.Linear, name: str) -> Callable[[Tensor], Tensor]:
            shifted = weights[name]  # (y, out, in): W + ΔW^a, constants

            def forward(h: Tensor) -> Tensor:
                branches = len(shifted) + 1
                # under autocast, the dtypes F.linear would compute in, autocast off inside
                args = _autocast_like_linear(h, module.weight, module.bias, shifted)
                with full_precision():
                    if sizes is not None:  # split: chunk a sees W + ΔW^a (chunk 0: W)
                        state["open"] = True
                        return _apply(_ChunkedLinear, *args, sizes)
                    if state["open"]:  # y+1 blocks of B rows, branch-major: W + ΔW^a
                        if len(h) != state["rows"]:
                            raise RuntimeError(
                                f"a smoothed layer after the branch point got {len(h)} rows, "
                                f"not the {state['rows']} of the y+1 branches"
                            )
                        return _apply(_ChunkedLinear, *args, [len(h) // branches] * branches)
                    state["open"], state["rows"] = True, branches * len(h)  # the branch point
                    return _apply(_BranchLinear, *args)

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


def _apply(function: type[torch.autograd.Function], *args: Any) -> Tensor:
    """``function.apply(*args)``, typed (torch leaves ``apply`` untyped)."""
    out: Tensor = function.apply(*args)  # type: ignore[no-untyped-call]
    return out


def _autocast_like_linear(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The input, weight, bias and shifted weights as ``F.linear`` takes them: cast to the
    autocast dtype of their device inside an autocast region, else as they are (the
    branched Linears then run with autocast off, their products in that dtype, and the
    casts' backward returns float32 gradients to float32 parameters)."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _batched_split(h: Tensor) -> bool:
    """Whether the y equal chunks (the split batching's, or the prefix batching's branch blocks
    after the branch point) run as one batched product: on an accelerator, where a small
    step is launch-bound; on the CPU a loop of y products is as fast and needs no copy."""
    return h.device.type != "cpu"


def _times(rows: Tensor, matrix: Tensor, transpose: bool, out: Tensor | None = None) -> Tensor:
    """``rows @ matrixᵀ`` (transpose: a Linear's forward) or ``rows @ matrix`` (its input
    gradient), over the last dimension; batched over a leading dimension of both."""
    return torch.matmul(rows, matrix.transpose(-1, -2) if transpose else matrix, out=out)


def _chunk_products(
    rows: Tensor, weight: Tensor, shifted: Tensor, sizes: list[int], transpose: bool
) -> Tensor:
    """Chunk 0 of ``rows`` (``(B, ..., k)``, cut along dim 0 into ``sizes``) times W, chunk
    ``a`` times ``W + ΔW^a = shifted[a-1]`` (see :func:`_times`)."""
    width = weight.shape[0] if transpose else weight.shape[1]
    out = rows.new_empty(*rows.shape[:-1], width)
    head, rest = rows[: sizes[0]], rows[sizes[0] :]
    _times(head, weight, transpose, out=out[: sizes[0]])
    if _batched_split(rows):
        chunks = rest.reshape(len(shifted), -1, rows.shape[-1])
        view = out[sizes[0] :].view(len(shifted), -1, width)
        _times(chunks, shifted, transpose, out=view)
    else:
        start = sizes[0]
        for chunk, matrix in zip(torch.split(rest, sizes[1:]), shifted, strict=True):
            _times(chunk, matrix, transpose, out=out[start : start + len(chunk)])
            start += len(chunk)
    return out


class _ChunkedLinear(torch.autograd.Function):
    """A Linear whose row chunks see different weights: chunk 0 W, chunk a the constant
    ``W + ΔW^a`` (the split batching's chunks, or the prefix batching's branch blocks after the
    branch point). ``h``: ``(B, ..., in)``, ``shifted``: ``(y, out, in)``. The weight
    gradient is ``Σ_a E_aᵀ H_a = Eᵀ H``, one product over all the rows instead of one per
    chunk; the input gradient is chunk-wise, ``E_a (W + ΔW^a)``."""

    @staticmethod
    def forward(
        h: Tensor, weight: Tensor, bias: Tensor | None, shifted: Tensor, sizes: list[int]
    ) -> Tensor:
        out = _chunk_products(h, weight, shifted, sizes, transpose=True)
        return out if bias is None else out.add_(bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        h, weight, bias, shifted, sizes = inputs
        ctx.save_for_backward(h, weight, shifted)
        ctx.sizes, ctx.has_bias = sizes, bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, shifted = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = _chunk_products(grad, weight, shifted, ctx.sizes, transpose=False)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat.T @ h.reshape(-1, h.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_h, grad_w, grad_b, None, None


class _BranchLinear(torch.autograd.Function):
    """The prefix batching's branch point: one input ``h`` (``(B, ..., in)``) times y+1
    weights, W and the constants ``shifted[a-1] = W + ΔW^a``, giving ``(y+1) B`` rows,
    branch-major. With ``E_a`` branch a's output gradient, the input gradient is
    ``Σ_a E_a (W + ΔW^a)`` and the weight gradient ``(Σ_a E_a)ᵀ h``, one product."""

    @staticmethod
    def forward(h: Tensor, weight: Tensor, bias: Tensor | None, shifted: Tensor) -> Tensor:
        rows = h.reshape(-1, h.shape[-1])
        out = h.new_empty((len(shifted) + 1) * len(h), *h.shape[1:-1], weight.shape[0])
        blocks = out.view(len(shifted) + 1, len(rows), weight.shape[0])
        for block, matrix in zip(blocks, [weight, *shifted], strict=True):
            _times(rows, matrix, True, out=block)
        return out if bias is None else out.add_(bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        h, weight, bias, shifted = inputs
        ctx.save_for_backward(h, weight, shifted)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, shifted = ctx.saved_tensors
        rows = h.reshape(-1, h.shape[-1])
        blocks = grad.reshape(len(shifted) + 1, len(rows), grad.shape[-1])
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = blocks[0] @ weight
            for block, matrix in zip(blocks[1:], shifted, strict=True):
                grad_h.addmm_(block, matrix)
            grad_h = grad_h.view_as(h)
        summed = blocks.sum(0)
        if ctx.needs_input_grad[1]:
            grad_w = summed.T @ rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = summed.sum(0)
        return grad_h, grad_w, grad_b, None


def split_sizes(batch: int, y: int) -> list[int]:
    """The chunks of the split batching: y chunks of ``s = batch // (y+1)`` rows for the
    perturbed points, the first ``batch − y s`` rows (at least ``s``) for W itself."""
    if batch < y + 1:
        raise InputError(
            f"the split batching needs at least y+1 = {y + 1} samples per batch, got {batch}"
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


def _full_batch(ple: PartialLocalEntropy) -> str:
    """Estimators evaluate every point on the whole batch: never the split batching."""
    return "naive" if ple.batching == "naive" else "prefix"


def _point_losses(
    ple: PartialLocalEntropy, x: Tensor, target: Tensor, deltas: dict[str, Tensor], chunk: int
) -> Tensor:
    """The mean loss at each perturbed point ``W + deltas[a]`` (no gradient)."""
    batching = _full_batch(ple)
    points = len(next(iter(deltas.values())))
    values = []
    with torch.no_grad():
        for start in range(0, points, chunk):
            part = {n: d[start : start + chunk] for n, d in deltas.items()}
            view = _variant(ple, y=len(next(iter(part.values()))), _batching=batching)
            if batching == "naive":
                losses, _ = view._naive(x, target, part)
            else:
                losses, _ = view._batched(x, target, view._shift(part))
            values.append(losses[1:])
    return torch.cat(values)


def m_loss(
    ple: PartialLocalEntropy, x: Tensor, target: Tensor, repeats: int = 32
) -> tuple[float, float]:
    """The M-loss (M3, restricted to U: M14) at the current weights, averaged over
    ``repeats`` independent draws of its y displacements, and its standard error."""
    view = _variant(ple, kind="plea", _batching=_full_batch(ple))
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


class _SmoothingOptions(LossOptions):
    """PLA or PLEA in a config (:class:`PartialLocalEntropy`): ``layers`` (default all),
    exactly one of ``R`` (the box) and ``gamma`` (the Gaussian distance of M11), ``y``
    perturbed points, a finite sharpness ``k``, ``batching``, ``antithetic`` pairs. The old
    key ``route`` is read as ``batching`` for one release."""

    plain: ClassVar[bool] = False
    #: the loss of Musso's that the options are for
    kind: ClassVar[Literal["pla", "plea"]]

    layers: list[str] | Literal["all"] = "all"
    R: float | None = Field(None, gt=0)
    gamma: float | None = Field(None, gt=0)
    y: int = Field(4, ge=0)
    k: float | None = Field(None, gt=0)
    batching: Batching = "auto"
    antithetic: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "route" in data:
            warn("loss key 'route'", "'batching'", stacklevel=6)
            data = {**data, "batching": data["route"]}
            del data["route"]
        if isinstance(data, dict) and data.get("layers", "all") is None:
            data = {**data, "layers": "all"}
        return data

    @model_validator(mode="after")
    def _one_distance(self) -> _SmoothingOptions:
        if (self.R is None) == (self.gamma is None):
            raise ValueError(
                f"loss {self.name} needs exactly one of R (the half-side of the sampling box) "
                f"and gamma (the Gaussian distance of Musso eq. 11)"
            )
        if self.k is not None and self.gamma is not None:
            raise ValueError("k sharpens the box kernel; the Gaussian distance (gamma) has none")
        return self

    def objective(self, model: nn.Module) -> Objective:
        """The smoothed loss; its displacements come from torch's global generator, which
        :class:`~sgdgeom.train.Trainer` seeds every epoch (so a resumed run replays them)."""
        return PartialLocalEntropy(
            model,
            layers=self.layers,
            R=self.R,
            gamma=self.gamma,
            y=self.y,
            kind=self.kind,
            k=self.k,
            batching=self.batching,
            antithetic=self.antithetic,
        ).objective


@register_loss("pla")
class PLAOptions(_SmoothingOptions):
    """PLA, Musso eq. (23) (eq. 19 with a finite k)."""

    kind: ClassVar[Literal["pla", "plea"]] = "pla"
    name: Literal["pla"] = "pla"


@register_loss("plea")
class PLEAOptions(_SmoothingOptions):
    """PLEA, Musso eq. (22) (eq. 14 with a finite k)."""

    kind: ClassVar[Literal["pla", "plea"]] = "plea"
    name: Literal["plea"] = "plea"
