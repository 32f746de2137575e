"""SiRA's expert (gate) dropout: in training each chosen (token, expert) slot is dropped with a rate."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from moejax.routing import plugin
from moejax.routing.noise import drop_gates
from moejax.routing.types import Routing


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class GateDropout(plugin.Transform):
    """``gate_dropout``: in training, :func:`~moejax.routing.drop_gates` with this rate (kept weights scaled by
    ``1 / (1 - rate)``)."""

    name: ClassVar[str] = "gate_dropout"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.TOKEN_CHOICE})
    gate_dropout: float = 0.0

    def __post_init__(self) -> None:
        r = self.gate_dropout
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            plugin.fail("gate_dropout", r, "must be in [0, 1)")

    def is_identity(self) -> bool:
        return self.gate_dropout == 0

    def on_routing(self, routing: Routing, call: plugin.RouteCall) -> Routing:
        if not call.train or self.gate_dropout == 0:
            return routing
        return drop_gates(routing, call.rng(), self.gate_dropout)
