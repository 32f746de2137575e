"""A toy router kind registered from outside the library: top-k over temperature-scaled scores.

This file is the whole mechanism: ``tests/test_plugin_router.py`` imports it and selects it by name from a
config (``router.kind='temperature_topk'``, ``router.temperature=0.5``), without editing ``moejax/``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax

from moejax.routing import plugin
from moejax.routing.topk import scores_from_logits, top_k_of_selection


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class TemperatureTopK(plugin.RouterKind):
    """Top-k of ``softmax(logits / temperature)``; the weights are those tempered probabilities, renormalised."""

    name: ClassVar[str] = "temperature_topk"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED, plugin.TOKEN_CHOICE, plugin.SELECTION_LOGITS,
                                                  plugin.SELECTION_SCORES})
    temperature: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            plugin.fail("temperature", t, "must be a finite number > 0")

    def route(self, logits: jax.Array, call: plugin.RouteCall):
        tempered = logits / self.temperature
        scores = scores_from_logits(tempered, "softmax")
        noisy = call.selection_logits(tempered)
        select = scores if noisy is tempered else scores_from_logits(noisy, "softmax")
        return top_k_of_selection(tempered, scores, call.selection_scores(select), call.k, score="softmax",
                                  renormalize=True, routed_scaling=1.0)
