"""What every FFN-family layer takes per call and what it returns, so that models never branch on the layer kind.

A model creates one :class:`LayerContext` per forward pass and threads it through its blocks; every layer
(sparse, soft, merged, chained, dense) is called as ``layer(x, ctx)`` and returns a :class:`LayerOutput`. The
model hands ``out.logits`` on to the next layer (``ctx.replace(router_logits=out.logits)``): a layer with a
learned router returns its own logits (MoE++ gating residuals read them), a layer without one returns the
logits it was given, so they flow from the most recent routed layer. RNGs are Flax's streams (``'jitter'`` for
routing noise, ``'dropout'``), drawn by the modules that need them.
"""
from __future__ import annotations

import jax
from flax import struct

from moejax.routing.types import RoutingStats


@struct.dataclass
class LayerContext:
    """Per-call inputs of an FFN layer.

    Attributes:
      token_ids: int[...] (x's leading shape) the vocabulary id of each token, for hash routers; None when the
        model has none (a hash router then hashes each token's index in the routed group).
      router_logits: float32[..., E] the previous routed layer's logits (MoE++ gating residual) or None.
      deterministic: False in training (training capacity factor, router noise, dropout); static.
      k: a model-level override of ``router.k`` (SMoE-Dropout's inference-time number of experts), clipped by each
        routed layer to its number of router outputs; layers without a ``k`` ignore it; static.
    """

    token_ids: jax.Array | None = None
    router_logits: jax.Array | None = None
    deterministic: bool = struct.field(pytree_node=False, default=True)
    k: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self) -> None:
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"moe_k={k!r}: must be None (each layer's router.k) or an int >= 1")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic={self.deterministic!r}: must be a bool")


def as_context(ctx: LayerContext | None, deterministic: bool | None) -> LayerContext:
    """The call's context: ``ctx``, or one built from the ``deterministic=`` shorthand (default True)."""
    if ctx is None:
        return LayerContext(deterministic=True if deterministic is None else deterministic)
    if not isinstance(ctx, LayerContext):
        raise ValueError(f"ctx: expected a LayerContext, got {type(ctx).__name__}")
    if deterministic is not None and deterministic != ctx.deterministic:
        raise ValueError(f"deterministic={deterministic}: contradicts ctx.deterministic={ctx.deterministic}; "
                         f"give one of them")
    return ctx


@struct.dataclass
class LayerOutput:
    """What every FFN layer returns.

    Attributes:
      y: the output, x's shape.
      stats: the layer's :class:`~moejax.routing.RoutingStats` (``RoutingStats.dense()`` for a dense FFN).
      logits: float32[..., E] router logits for the next routed layer: this layer's own (after its gating residual),
        None for a routed layer without learned logits (hash, random), or the incoming ``ctx.router_logits`` for a
        layer without a token router (dense, Soft MoE, SMEAR).
    """

    y: jax.Array
    stats: RoutingStats
    logits: jax.Array | None = None
