"""Flax layers: the MoE layer and the dense FFN baseline with the same interface."""
from moejax.layers.dense import DenseLayer
from moejax.layers.moe import MoELayer

__all__ = ["DenseLayer", "MoELayer"]
