"""Expert steering (SteerMoE, Fayyaz et al. 2025): fixed per-expert offsets on the router logits at inference."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class Steer(plugin.Transform):
    """``steer``: add ``moe_state/steer_offset`` float32[E] (one offset per router output, per layer) to the router
    logits float32[T, E] of any kind with learned logits. A large positive offset forces an expert into every
    token's top-k (token-choice kinds), a large negative one removes it (its softmax probability becomes 0); zeros
    change nothing. The offsets live in the non-gradient collection, so each MoE layer has its own even when the
    model config shares one MoE spec, and a checkpoint carries them; nothing ever updates them.

    The offset enters the logits themselves (not only the selection), so the combine weights, the auxiliary losses
    and a gating residual's hand-over to the next layer all see the steered logits, as SteerMoE's modified router
    does. With expert-choice kinds an offset on expert ``e`` shifts every token's score for ``e`` equally, so it
    changes the weights, not which tokens ``e`` picks. :mod:`moejax.surgery.steer` sets the offsets.

    Applying a steered model without ``moe_state`` is an error naming the collection (missing offsets would
    silently route unsteered)."""

    name: ClassVar[str] = "steer"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED})
    steer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steer, bool):
            plugin.fail("steer", self.steer, "must be a bool")

    def is_identity(self) -> bool:
        return not self.steer

    def on_logits(self, logits: jax.Array, call: plugin.RouteCall) -> jax.Array:
        offset = plugin.expert_state(call, "steer_offset", "steer", "offsets")
        return logits + jax.lax.stop_gradient(offset.value.astype(jnp.float32))
