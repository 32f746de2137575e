"""The standard objective: one forward pass, mean cross-entropy plus the layers' weighted losses."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax

from moejax.training.plugin import Objective, PassOutput, register_objective


@register_objective
@dataclasses.dataclass(frozen=True)
class Standard(Objective):
    """``standard``: ``L = CE + sum of the layers' weighted losses`` on one pass."""

    name: ClassVar[str] = "standard"

    def combine(self, runs: Sequence[PassOutput]) -> tuple[jax.Array, dict[str, jax.Array]]:
        return runs[0].loss, {}
