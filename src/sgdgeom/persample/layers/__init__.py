"""Layer rules, one file each, and the registry that maps module types to them."""

from sgdgeom.persample.layers import attention, conv, embedding, fallback, linear, norm
from sgdgeom.persample.layers.registry import (
    LayerRule,
    decline_reason,
    register_fallback,
    register_rule,
    registered_types,
    rule_for,
)

__all__ = [
    "LayerRule",
    "attention",
    "conv",
    "decline_reason",
    "embedding",
    "fallback",
    "linear",
    "norm",
    "register_fallback",
    "register_rule",
    "registered_types",
    "rule_for",
]
