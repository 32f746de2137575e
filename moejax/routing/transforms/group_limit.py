"""Group-limited routing (DeepSeek-V2 / V3): experts may only be chosen from the best groups."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moejax.routing import plugin
from moejax.routing.topk import limit_to_top_groups


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class GroupLimit(plugin.Transform):
    """``num_groups`` equal groups of experts, each scored by the ``max`` of its selection scores (DeepSeek-V2) or
    the sum of its top two (``top2_sum``, V3); only the ``top_groups`` best groups may be chosen
    (:func:`~moejax.routing.limit_to_top_groups`). ``top_groups=None`` keeps every group."""

    name: ClassVar[str] = "group_limit"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.SELECTION_SCORES})
    num_groups: int = 1
    top_groups: int | None = None
    group_score: str = "max"

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            plugin.fail("num_groups", self.num_groups, "must be an integer >= 1")
        if self.top_groups is not None:
            if isinstance(self.top_groups, bool) or not isinstance(self.top_groups, int) or self.top_groups < 1:
                plugin.fail("top_groups", self.top_groups, "must be an integer >= 1")
            if self.top_groups > self.num_groups:
                plugin.fail("top_groups", self.top_groups, f"must be <= router.num_groups={self.num_groups}")
        if self.group_score not in ("max", "top2_sum"):
            plugin.fail("group_score", self.group_score, "must be one of ['max', 'top2_sum']")

    def is_identity(self) -> bool:
        return self.num_groups == 1 and self.top_groups is None

    def check_layer(self, layer: plugin.LayerFacts) -> None:
        e = layer.num_routed
        if e % self.num_groups:
            plugin.fail("num_groups", self.num_groups, f"must divide {layer.routed_name}={e}")
        if self.top_groups is not None and layer.k > self.top_groups * (e // self.num_groups):
            plugin.fail("k", layer.k, f"must be <= router.top_groups * experts per group = "
                                      f"{self.top_groups * (e // self.num_groups)}")
        if self.group_score == "top2_sum" and self.num_groups > 1 and e // self.num_groups < 2:
            plugin.fail("group_score", self.group_score, "top2_sum needs at least 2 experts per group")

    def on_selection_scores(self, scores: jax.Array, call: plugin.RouteCall) -> jax.Array:
        if self.top_groups is None or self.top_groups >= self.num_groups:
            return scores
        return limit_to_top_groups(scores, self.num_groups, self.top_groups, self.group_score)
