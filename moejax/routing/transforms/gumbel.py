"""Gumbel-top-k exploration: noise on the logits that *select* experts, in training only."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax

from moejax.routing import plugin
from moejax.routing.noise import gumbel_noise


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class Gumbel(plugin.Transform):
    """``gumbel_noise``: in training, experts are ordered by ``logits + scale * Gumbel`` (sampling without
    replacement from the router's softmax); the combine weights stay the noise-free scores."""

    name: ClassVar[str] = "gumbel"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.SELECTION_LOGITS})
    gumbel_noise: float = 0.0

    def __post_init__(self) -> None:
        s = self.gumbel_noise
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            plugin.fail("gumbel_noise", s, "must be a finite number >= 0")

    def is_identity(self) -> bool:
        return self.gumbel_noise == 0

    def on_selection_logits(self, logits: jax.Array, call: plugin.RouteCall) -> jax.Array:
        if not call.train or self.gumbel_noise == 0:
            return logits
        return logits + jax.lax.stop_gradient(gumbel_noise(call.rng(), logits.shape, self.gumbel_noise))
