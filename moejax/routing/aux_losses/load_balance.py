"""The Switch/GShard load-balancing loss (Fedus et al. 2021; Lepikhin et al. 2020), with MoE++'s per-output weights."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moejax.routing.loss import Loss, LossInputs, register_loss
from moejax.routing.losses import balance_loss


@register_loss
@dataclasses.dataclass(frozen=True)
class LoadBalance(Loss):
    """``load_balance``: ``E * sum_e eta_e f_e P_e``.

    ``f_e``: the fraction of valid token copies routed to output ``e`` before capacity drops (no gradient);
    ``P_e``: its mean router probability; ``eta_e``: :attr:`LossInputs.balance_weights` (1, or MoE++'s ``tau`` for
    zero-computation experts, its heterogeneous load balance). With every ``eta_e = 1``: 1.0 under uniform routing
    (``f_e = P_e = 1/E``), and its minimum over ``P`` for a given ``f`` is ``E * min_e f_e`` (all probability on
    the least-loaded output), 0 when some output gets no copy; expert choice has ``f_e = 1/E`` by construction, so
    the loss is exactly 1 and gives no gradient. Default weight 0.01 (Switch Transformer's alpha).
    """

    name: ClassVar[str] = "load_balance"
    load_balance_weight: float = 0.01

    def __post_init__(self) -> None:
        self.check_weight()

    def value(self, inputs: LossInputs) -> jax.Array:
        return balance_loss(inputs.fraction, inputs.probs, inputs.balance_weights)
