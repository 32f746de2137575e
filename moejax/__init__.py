"""moejax: sparse Mixture-of-Experts in JAX/Flax.

An MoE layer is ``combine(experts(dispatch(x, route(x))))``; each piece lives in its own subpackage:
:mod:`moejax.routing`, :mod:`moejax.experts`, :mod:`moejax.dispatch`, :mod:`moejax.layers`, with
:mod:`moejax.reference` as the oracle for all fast paths.
"""
from moejax import libtpu_env as _libtpu_env

_libtpu_env.prepare()        # before jax's first device query: no libtpu warnings on hosts without a TPU

from moejax.config import DispatchConfig, MoEConfig, RouterConfig  # noqa: E402
from moejax.context import LayerContext, LayerOutput  # noqa: E402
from moejax.layers import DenseLayer, MoELayer  # noqa: E402
from moejax.routing.types import ExpertChoiceRouting, Routing, RoutingStats  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DenseLayer", "DispatchConfig", "ExpertChoiceRouting", "LayerContext", "LayerOutput",
           "MoEConfig", "MoELayer", "RouterConfig", "Routing", "RoutingStats"]
