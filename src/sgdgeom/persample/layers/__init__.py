"""Layer rules, one file each, and the registry that maps module types to them."""

from sgdgeom.persample.layers import attention, conv, embedding, fallback, linear, norm
from sgdgeom.persample.layers.registry import (
    LayerRule,
    register_fallback,
    register_rule,
    rule_for,
)

__all__ = [
    "LayerRule",
    "attention",
    "conv",
    "embedding",
    "fallback",
    "linear",
    "norm",
    "register_fallback",
    "register_rule",
    "rule_for",
]
