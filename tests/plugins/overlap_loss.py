"""A loss registered from outside the library: a penalty on how much the experts' routing probabilities overlap.

This file is the whole mechanism: ``tests/test_losses.py`` imports it and turns it on from a router config
(``router.overlap_weight=0.1``) without editing ``moejax/``; the trainer adds it and logs it as ``loss/overlap``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing.loss import Loss, LossInputs, register_loss


@register_loss
@dataclasses.dataclass(frozen=True)
class Overlap(Loss):
    """``overlap``: mean over pairs of distinct experts of the cosine of their probability columns ``P[:, e]``.

    0 (its minimum) when no token gives probability to two experts; 1 under uniform routing."""

    name: ClassVar[str] = "overlap"
    overlap_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check_weight()

    def value(self, inputs: LossInputs) -> jax.Array:
        p = inputs.probs.astype(jnp.float32)
        unit = p / (jnp.linalg.norm(p, axis=0, keepdims=True) + 1e-12)
        gram = unit.T @ unit
        e = gram.shape[0]
        return (gram.sum() - jnp.trace(gram)) / (e * (e - 1))
