"""The importance loss of Shazeer et al. (2017)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moejax.routing.loss import Loss, LossInputs, register_loss
from moejax.routing.losses import cv_squared


@register_loss
@dataclasses.dataclass(frozen=True)
class Importance(Loss):
    """``importance``: ``CV(importance)^2 = Var_e / Mean_e^2`` of each output's summed combine weight.

    0 (its minimum) when every output gets the same total weight, e.g. under uniform routing; up to ``E - 1`` when
    one output gets all of it. Off by default (weight 0; the paper used 0.1).
    """

    name: ClassVar[str] = "importance"
    importance_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check_weight()

    def value(self, inputs: LossInputs) -> jax.Array:
        return cv_squared(inputs.weight_sums)
