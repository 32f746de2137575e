"""moejax: sparse Mixture-of-Experts in JAX/Flax.

An MoE layer is ``combine(experts(dispatch(x, route(x))))``; each piece lives in its own subpackage:
:mod:`moejax.routing`, :mod:`moejax.experts`, :mod:`moejax.dispatch`, :mod:`moejax.layers`, with
:mod:`moejax.reference` as the oracle for all fast paths.
"""
from moejax.config import DispatchConfig, MoEConfig, RouterConfig
from moejax.context import LayerContext, LayerOutput
from moejax.layers import DenseLayer, MoELayer
from moejax.routing.types import AuxLosses, ExpertChoiceRouting, Routing, RoutingStats

__version__ = "0.1.0"
__all__ = ["AuxLosses", "DenseLayer", "DispatchConfig", "ExpertChoiceRouting", "LayerContext", "LayerOutput",
           "MoEConfig", "MoELayer", "RouterConfig", "Routing", "RoutingStats"]
