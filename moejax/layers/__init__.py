"""Flax layers: the MoE layer, the layer-level mechanisms built on it, and the dense FFN baseline.

Every layer is called as ``layer(x [..., D], ctx: LayerContext)`` and returns a ``LayerOutput`` (y, stats, logits
for the next routed layer); see :mod:`moejax.context`. ``LAYERS`` maps ``MoEConfig.layer`` to the module class that
builds it (:func:`make_layer`).
"""
from __future__ import annotations

import flax.linen as nn

from moejax.config import MoEConfig
from moejax.context import LayerContext, LayerOutput
from moejax.layers.chain import ChainOfExpertsLayer, chain_stats
from moejax.layers.dense import DenseLayer
from moejax.layers.moe import MoELayer
from moejax.layers.smear import SMEARLayer
from moejax.layers.soft_moe import SoftMoELayer, SoftRouting, soft_logits, soft_routing

LAYERS: dict[str, type[nn.Module]] = {"sparse": MoELayer, "soft": SoftMoELayer, "smear": SMEARLayer,
                                      "chain": ChainOfExpertsLayer}


def make_layer(config: MoEConfig, name: str | None = None) -> nn.Module:
    """The layer ``config.layer`` selects: MoELayer, SoftMoELayer, SMEARLayer or ChainOfExpertsLayer."""
    return LAYERS[config.layer](config, name=name)


__all__ = ["LAYERS", "LayerContext", "LayerOutput", "ChainOfExpertsLayer", "DenseLayer", "MoELayer", "SMEARLayer",
           "SoftMoELayer", "SoftRouting", "chain_stats", "make_layer", "soft_logits", "soft_routing"]
