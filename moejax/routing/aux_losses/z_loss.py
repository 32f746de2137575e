"""The router z-loss of ST-MoE (Zoph et al. 2022)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing.loss import Loss, LossInputs, register_loss
from moejax.routing.losses import router_z_loss


@register_loss
@dataclasses.dataclass(frozen=True)
class ZLoss(Loss):
    """``z_loss``: ``mean_t logsumexp(logits_t)^2``; 0 for routers without learned logits (hash, random).

    Under uniform routing at logits ``c`` it is ``(c + log E)^2`` (``log(E)^2`` at zero logits); its minimum, 0, is
    reached when every token's ``logsumexp`` is 0. Default weight 0.001 (ST-MoE's ``c_z``).
    """

    name: ClassVar[str] = "z_loss"
    z_loss_weight: float = 0.001

    def __post_init__(self) -> None:
        self.check_weight()

    def value(self, inputs: LossInputs) -> jax.Array:
        if inputs.logits is None:
            return jnp.zeros((), jnp.float32)
        return router_z_loss(inputs.logits)
