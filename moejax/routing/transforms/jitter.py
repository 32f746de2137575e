"""Switch Transformer's input jitter: multiplicative uniform noise on the router input in training."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class Jitter(plugin.Transform):
    """``jitter_noise`` ``eps``: in training the router sees ``x * U(1 - eps, 1 + eps)`` (``'jitter'`` RNG)."""

    name: ClassVar[str] = "jitter"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED})
    jitter_noise: float = 0.0

    def __post_init__(self) -> None:
        eps = self.jitter_noise
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
                or not 0.0 <= eps < 1.0:
            plugin.fail("jitter_noise", eps, "must be in [0, 1)")

    def is_identity(self) -> bool:
        return self.jitter_noise == 0

    def on_input(self, x: jax.Array, call: plugin.RouteCall) -> jax.Array:
        if not call.train or self.jitter_noise == 0:
            return x
        eps = self.jitter_noise
        return x * jax.random.uniform(call.rng(), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
