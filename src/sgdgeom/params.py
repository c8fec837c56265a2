"""The parameter space: named parameters <-> flat vectors, grouped by layer.

Every operator in sgdgeom acts on flat vectors ``x ∈ R^d`` holding all trainable
parameters of a model, concatenated in ``named_parameters()`` order. :class:`ParamSpace`
is the one map between that flat format and the ``dict[str, Tensor]`` format of
``model.named_parameters()``.

A *layer* is a module that owns parameters directly (``fc1`` owns ``fc1.weight`` and
``fc1.bias``). Musso's layer quantities use the layer's *weights* only: biases are
parameters whose name ends in ``bias`` (Musso, footnote 15).

Examples:
    >>> from torch import nn
    >>> space = ParamSpace(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)))
    >>> space.dim, space.layers
    (11, ['0', '1'])
    >>> space.layer_params("1")
    ['1.weight', '1.bias']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from sgdgeom.errors import InputError
from sgdgeom.precision import compute_dtype

__all__ = ["ParamSpace", "set_parameters"]


class ParamSpace:
    """Flat-vector view of a model's trainable parameters (or of ``(name, tensor)`` pairs).

    Attributes:
        names: parameter names in ``named_parameters()`` order.
        shapes: their shapes.
        dim: ``d``, the total number of trainable scalars.
        dtype: what flat vectors and products are in: the parameters' dtype, or float32
            for bfloat16 and float16 parameters (:func:`compute_dtype`).
        layers: names of the modules that own parameters, in order.
    """

    def __init__(self, model: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        pairs = model.named_parameters() if isinstance(model, nn.Module) else model
        named = [(n, p) for n, p in pairs if p.requires_grad]
        if not named:
            raise InputError("the model has no trainable parameters")
        self._build(
            [n for n, _ in named],
            [p.shape for _, p in named],
            compute_dtype(named[0][1].dtype),
            named[0][1].device,
        )

    def _build(
        self, names: list[str], shapes: list[torch.Size], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.names: list[str] = names
        self.shapes: list[torch.Size] = shapes
        self.numels: list[int] = [shape.numel() for shape in shapes]
        self.offsets: list[int] = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.dim: int = self.offsets[-1]
        self.dtype = dtype
        self.device = device
        self._index = {n: i for i, n in enumerate(self.names)}
        self._layer_of = {n: n.rpartition(".")[0] for n in self.names}
        self.layers: list[str] = list(dict.fromkeys(self._layer_of.values()))

    def __repr__(self) -> str:
        return f"ParamSpace(dim={self.dim}, layers={self.layers})"

    def subspace(self, names: Iterable[str]) -> ParamSpace:
        """The space of some of these parameters (in this space's order): a layer's, for
        its block of an operator."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown or not wanted:
            raise InputError(
                f"no parameters {sorted(unknown)} in this space"
                if unknown
                else "a subspace needs at least one parameter"
            )
        space = ParamSpace.__new__(ParamSpace)
        kept = [i for i, n in enumerate(self.names) if n in wanted]
        space._build(
            [self.names[i] for i in kept], [self.shapes[i] for i in kept], self.dtype, self.device
        )
        return space

    # ------------------------------------------------------------ conversions

    def flatten(self, tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (a dict by name, or a list in order) into ``(d,)``
        (floating ones in :attr:`dtype`); a trailing batch dimension is kept: ``(*shape, k)``
        tensors give ``(d, k)``."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise KeyError(f"missing parameters {missing}")
            tensors = [tensors[n] for n in self.names]
        parts = list(tensors)
        if len(parts) != len(self.names):
            raise InputError(f"expected {len(self.names)} tensors, got {len(parts)}")
        batched = parts[0].dim() == len(self.shapes[0]) + 1
        if batched:
            flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in parts])
        else:
            flat = torch.cat([t.reshape(-1) for t in parts])
        return flat.to(self.dtype) if flat.is_floating_point() else flat

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(d,)`` vector into a dict of views shaped like the parameters."""
        if vector.shape[0] != self.dim or vector.dim() != 1:
            raise InputError(
                f"expected a flat vector of shape ({self.dim},), got {tuple(vector.shape)}"
            )
        return {
            name: vector[start:stop].view(shape)
            for name, shape, start, stop in zip(
                self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }

    def check_vector(self, v: Tensor, what: str = "v") -> None:
        """Refuse a vector that an operator on this space cannot take as it is: another
        length, dtype or device (converting silently could lose precision or move data)."""
        if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != self.dim:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"{what} must be a ({self.dim},) tensor, got {shape}")
        if v.dtype != self.dtype or v.device != self.device:
            raise InputError(
                f"{what} is {str(v.dtype).removeprefix('torch.')} on {v.device}, but the "
                f"operator works in {str(self.dtype).removeprefix('torch.')} on {self.device}: "
                f"pass {what}.to(dtype=torch.{str(self.dtype).removeprefix('torch.')}, "
                f"device='{self.device}')"
            )

    def apply(
        self, operator: Callable[[Tensor], Tensor], v: Tensor | Mapping[str, Tensor]
    ) -> Tensor | dict[str, Tensor]:
        """An operator ``(d,) -> (d,)`` applied to a flat vector, to each column of a
        ``(d, k)`` matrix, or to a dict of tensors by parameter name (a dict comes back)."""
        if isinstance(v, Mapping):
            return self.unflatten(operator(self.flatten(v)))
        if isinstance(v, Tensor) and v.dim() == 2:
            return torch.stack([operator(column) for column in v.T], 1)
        return operator(v)

    def params(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's current trainable parameters as a dict (the tensors themselves)."""
        named = dict(model.named_parameters())
        return {n: named[n] for n in self.names}

    def vector(self, model: nn.Module) -> Tensor:
        """The model's current parameters as one flat vector (a copy)."""
        return self.flatten(p.detach() for p in self.params(model).values())

    # ------------------------------------------------------------ layers

    def slice(self, name: str) -> slice:
        """Where parameter ``name`` lies in the flat vector."""
        i = self._index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    def layer_params(self, layer: str) -> list[str]:
        """The parameter names owned by ``layer``."""
        self._check_layer(layer)
        return [n for n in self.names if self._layer_of[n] == layer]

    def layer_mask(self, layer: str, weights_only: bool = False) -> Tensor:
        """A boolean ``(d,)`` mask of ``layer``'s parameters (its weights only, if asked)."""
        mask = torch.zeros(self.dim, dtype=torch.bool, device=self.device)
        for name in self.layer_params(layer):
            if not (weights_only and self.is_bias(name)):
                mask[self.slice(name)] = True
        return mask

    def layer_numel(self, layer: str, weights_only: bool = False) -> int:
        """The number of scalars in ``layer`` (``N_I`` of Musso eq. 2 with weights_only)."""
        return sum(
            self.numels[self._index[n]]
            for n in self.layer_params(layer)
            if not (weights_only and self.is_bias(n))
        )

    @staticmethod
    def is_bias(name: str) -> bool:
        """Biases are parameters named ``*.bias`` (or ``bias``), or whose own name starts
        with ``bias_`` or ends with ``_bias`` (a recurrent layer's ``bias_ih_l0``,
        attention's ``in_proj_bias``)."""
        local = name.rpartition(".")[2]
        return local == "bias" or local.startswith("bias_") or local.endswith("_bias")

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise KeyError(f"unknown layer {layer!r}; the layers are {', '.join(self.layers)}")


def set_parameters(model: nn.Module, x: Tensor) -> None:
    """Load the flat vector ``x`` into the model's trainable parameters."""
    space = ParamSpace(model)
    with torch.no_grad():
        for p, value in zip(space.params(model).values(), space.unflatten(x).values(), strict=True):
            p.copy_(value)
