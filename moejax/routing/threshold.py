"""Token-level dynamic expert activation by a score threshold (DynaMoE's routing, as we implement it).

Gülmez 2026, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity for
Mixture-of-Experts Neural Networks" (arXiv:2603.01697). What we could read of the paper (abstract and
summaries; not the method section) says: the number of experts per token varies with the input, "ranging
from a minimum of 1 to a layer-dependent maximum", chosen by "percentile-thresholded gating". The exact
formula was not available to us, so this is our reading, stated precisely:

* ``mode='probability'``: expert ``e`` is active for token ``t`` iff its router score ``s_te >= tau`` with
  a fixed ``tau = threshold`` (the fallback the issue asked for).
* ``mode='percentile'``: the same with ``tau`` = the ``threshold``-th percentile (``0 < q < 100``, linear
  interpolation, ``jnp.percentile``) of all ``T E`` router scores of the routed group, without gradient —
  so about ``(100 - q)%`` of all token-expert pairs pass, and confident tokens (one large score) activate
  fewer experts than uncertain ones.
* In both modes the token's best expert is always active (the minimum of 1) and at most ``K = router.k``
  experts are (the layer-dependent maximum; per-layer values come from
  :func:`moejax.routing.schedules.scheduled_moe_layers`), the ``K`` largest if more pass.
* Weights are the router scores of the active experts (``renormalize`` divides them by their sum).

The result is an ordinary :class:`Routing` with ``K`` slots in descending score and ``valid`` marking the
active prefix, so dispatch and the oracle apply unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin
from moejax.routing.topk import check_weights, finish_token_choice, scores_from_logits
from moejax.routing.types import Routing

THRESHOLD_MODES = ("probability", "percentile")


def threshold_routing(logits: jax.Array, threshold: float, max_k: int, *, mode: str = "probability",
                      score: str = "softmax", renormalize: bool = False, routed_scaling: float = 1.0) -> Routing:
    """Each token activates every expert whose score reaches the threshold: at least 1, at most ``max_k``.

    Args:
      logits: float32[T, E] router logits.
      threshold: ``tau`` in ``(0, 1]`` for ``mode='probability'``; the percentile ``q`` in ``(0, 100)``
        for ``mode='percentile'``.
      max_k: ``K``, ``1 <= K <= E``.
      score: ``softmax`` or ``sigmoid`` router scores (what is thresholded and what weighs).
      renormalize, routed_scaling: as in :func:`top_k_routing`.

    Returns:
      ``Routing`` with expert_index int32[T, K] in descending score, valid bool[T, K] (a non-empty prefix).
    """
    t, e = logits.shape
    if not 1 <= max_k <= e:
        raise ValueError(f"router.k={max_k}: must be in [1, num_experts={e}]")
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"router.threshold_mode={mode!r}: must be one of {list(THRESHOLD_MODES)}")
    scores = scores_from_logits(logits, score)
    if mode == "percentile":
        tau = jnp.percentile(jax.lax.stop_gradient(scores), threshold)
    else:
        tau = jnp.float32(threshold)
    weight, expert_index = jax.lax.top_k(scores, max_k)
    valid = (jax.lax.stop_gradient(weight) >= tau) | (jnp.arange(max_k) == 0)[None, :]
    weight = jnp.where(valid, weight, 0.0)
    if renormalize:
        weight = weight / (weight.sum(-1, keepdims=True) + 1e-20)
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdims=True)
    return finish_token_choice(logits, probs, expert_index.astype(jnp.int32), weight * routed_scaling, valid)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class Threshold(plugin.RouterKind):
    """``threshold`` (DynaMoE): every expert whose score reaches ``threshold`` (required), 1 to ``router.k`` per
    token; ``threshold_mode`` ``probability`` (``threshold`` in ``(0, 1]``) or ``percentile`` (in ``(0, 100)``)."""

    name: ClassVar[str] = "threshold"
    dynamic_k: ClassVar[bool] = True
    threshold: float | None = None
    threshold_mode: str = "probability"
    score: str = "softmax"
    renormalize: bool = False
    routed_scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.threshold_mode not in THRESHOLD_MODES:
            plugin.fail("threshold_mode", self.threshold_mode, f"must be one of {list(THRESHOLD_MODES)}")
        th = self.threshold
        if th is None:
            plugin.fail("threshold", th, "required for router.kind='threshold'")
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not math.isfinite(th):
            plugin.fail("threshold", th, "must be a number")
        if self.threshold_mode == "probability" and not 0.0 < th <= 1.0:
            plugin.fail("threshold", th, "must be in (0, 1] for threshold_mode='probability'")
        if self.threshold_mode == "percentile" and not 0.0 < th < 100.0:
            plugin.fail("threshold", th, "must be in (0, 100) for threshold_mode='percentile'")
        check_weights(self.score, self.renormalize, self.routed_scaling)

    def route(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        return threshold_routing(logits, self.threshold, call.k, mode=self.threshold_mode, score=self.score,
                                 renormalize=self.renormalize, routed_scaling=self.routed_scaling)
