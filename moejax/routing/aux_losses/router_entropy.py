"""The router-entropy ("dynamic") loss of top-p routing (Huang et al. 2024)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moejax.routing.loss import Loss, LossInputs, register_loss
from moejax.routing.losses import mean_entropy


@register_loss
@dataclasses.dataclass(frozen=True)
class RouterEntropy(Loss):
    """``router_entropy``: the mean entropy (nats) of each token's router distribution.

    Huang et al. 2024 add it as ``beta * L_d`` so that the router concentrates its mass and fewer experts reach
    the top-p threshold. ``log E`` under uniform routing, 0 (its minimum) when every token puts all its mass on
    one expert. Differentiable through the probabilities; a constant for routers without learned logits. Off by
    default (weight 0; ``beta`` is left to the config).
    """

    name: ClassVar[str] = "router_entropy"
    router_entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check_weight()

    def value(self, inputs: LossInputs) -> jax.Array:
        return mean_entropy(inputs.probs)
