"""THOR's consistency-regularised objective (Zuo et al. 2022, "Taming Sparsely Activated Transformer with
Stochastic Experts", arXiv:2110.04260)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import jax

from moejax.routing.fixed import consistency_loss
from moejax.training.plugin import Objective, PassOutput, register_objective


@register_objective
@dataclasses.dataclass(frozen=True)
class Consistency(Objective):
    """``consistency`` (``train.consistency_weight = alpha > 0``): two forward passes ``a``, ``b`` under different
    RNGs (dropout, router jitter, random routing) and ``L = L_a + L_b + alpha * consistency_loss(logits_a,
    logits_b)``, each ``L`` the single-pass objective. The two cross-entropies are *summed*, not averaged, as in the
    paper's objective ``CE(p1) + CE(p2) + alpha CR(p1, p2)`` and the authors' code (``loss1 + loss2 + alpha *
    consistency``; their CE and CR are both summed over tokens, ours both averaged, so ``alpha`` has the same
    meaning). Gradient flows through both passes and both directions of the KL. Metric ``consistency``: the
    unweighted regulariser.
    """

    name: ClassVar[str] = "consistency"
    passes: ClassVar[int] = 2
    consistency_weight: float = 0.0

    def __post_init__(self) -> None:
        w = self.consistency_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise ValueError(f"train.consistency_weight={w!r}: must be a finite number >= 0")

    def is_identity(self) -> bool:
        return self.consistency_weight == 0

    def combine(self, runs: Sequence[PassOutput]) -> tuple[jax.Array, dict[str, jax.Array]]:
        cr = consistency_loss(runs[0].logits, runs[1].logits)
        return runs[0].loss + runs[1].loss + self.consistency_weight * cr, {"consistency": cr}
