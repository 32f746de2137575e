"""MoE++ gating residuals: a layer's router logits plus the previous MoE layer's."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class GatingResidual(plugin.Transform):
    """``gating_residual``: add ``call.prev_logits`` float32[T, E] (the previous routed layer's logits, threaded by
    the model through the layer's call context) to this layer's logits; a first layer gets none."""

    name: ClassVar[str] = "gating_residual"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED})
    gating_residual: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.gating_residual, bool):
            plugin.fail("gating_residual", self.gating_residual, "must be a bool")

    def is_identity(self) -> bool:
        return not self.gating_residual

    def on_logits(self, logits: jax.Array, call: plugin.RouteCall) -> jax.Array:
        if not self.gating_residual or call.prev_logits is None:
            return logits
        return logits + call.prev_logits.reshape(logits.shape).astype(jnp.float32)
