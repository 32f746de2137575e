"""Dynamic top-p routing: a token takes as many experts as it needs to reach probability mass ``p``.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(arXiv:2403.07652). The paper computes ``P = softmax(x W)`` over experts, sorts it in descending order
and keeps the smallest prefix whose cumulative probability reaches the threshold ``p``; the output is
``sum_{e in S} P_e * f_e(x)``.

What is implemented here, and the choices where the paper leaves room:

* The set is expressed as an ordinary token-choice :class:`Routing` with ``K = max_k`` slots in
  descending probability; slot ``j`` is valid iff the probability mass of the slots *before* it is
  below ``p`` (so the first slot is always used and the set is the smallest prefix that reaches ``p``).
  The paper has no maximum; ``max_k`` (``router.k``) bounds compute and fixes the static shape ``K``.
  With ``max_k = E`` and ``p = 1`` every expert is used.
* Weights are the raw probabilities of the kept experts, as in the paper's output formula;
  ``renormalize=True`` divides them by their sum instead.
* The paper's "dynamic loss" (minimising the router entropy so that the router does not spread
  mass thinly to activate many experts) is the differentiable ``Routing.entropy`` /
  ``RoutingStats.router_entropy`` already reported by every router; weight it in the trainer.
* Optional ``selection_noise`` (Gumbel noise in training) changes the *order* in which experts are
  taken; the threshold is always on the noise-free probabilities (sampling experts without
  replacement until the sampled mass reaches ``p``).

Statistics: ``Routing.experts_per_token`` (before capacity drops) and
:func:`active_experts_histogram`; ``RoutingStats.experts_per_token`` reports the mean after drops.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import dataclasses
from typing import ClassVar

from moejax.routing import plugin
from moejax.routing.topk import check_weights, finish_token_choice
from moejax.routing.types import Routing


def top_p_routing(
    logits: jax.Array,
    p: float,
    max_k: int,
    *,
    renormalize: bool = False,
    routed_scaling: float = 1.0,
    selection_noise: jax.Array | None = None,
    order_logits: jax.Array | None = None,
) -> Routing:
    """Per token, the fewest experts (by descending probability) whose probabilities sum to ``>= p``.

    Args:
      logits: float32[T, E] router logits.
      p: the probability threshold, ``0 < p <= 1``.
      max_k: ``K``, the most experts a token may take, ``1 <= K <= E``.
      renormalize: weights = kept probabilities divided by their sum (default: the raw probabilities).
      routed_scaling: multiplies the final weights.
      selection_noise: optional float32[T, E] added to the logits to order the experts (not to weigh them).
      order_logits: optional float32[T, E] logits that order the experts instead (e.g. already noisy); no
        gradient flows through them.

    Returns:
      ``Routing`` with expert_index int32[T, K] in descending (noisy) probability, weight float32[T, K]
      (zero on unused slots) and valid bool[T, K] marking the used prefix of each row.
    """
    t, e = logits.shape
    if not 1 <= max_k <= e:
        raise ValueError(f"router.k={max_k}: must be in [1, num_experts={e}]")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"router.top_p={p}: must be in (0, 1]")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if selection_noise is not None:
        order_logits = logits + jax.lax.stop_gradient(selection_noise)
    order_by = probs if order_logits is None else jax.lax.stop_gradient(order_logits)
    _, expert_index = jax.lax.top_k(order_by, max_k)
    weight = jnp.take_along_axis(probs, expert_index, axis=-1)
    mass_before = jax.lax.stop_gradient(jnp.cumsum(weight, axis=-1) - weight)
    valid = mass_before < p
    if renormalize:
        kept = jnp.where(valid, weight, 0.0)
        weight = kept / (kept.sum(-1, keepdims=True) + 1e-20)
    weight = weight * routed_scaling
    return finish_token_choice(logits, probs, expert_index.astype(jnp.int32), weight, valid)


def active_experts_histogram(valid: jax.Array) -> jax.Array:
    """float32[K + 1]: fraction of tokens that use exactly 0, 1, ..., K experts. valid: bool[T, K]."""
    k = valid.shape[-1]
    counts = valid.sum(-1)
    return jax.nn.one_hot(counts, k + 1, dtype=jnp.float32).mean(0)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class TopP(plugin.RouterKind):
    """``top_p``: each token takes the fewest experts whose softmax probability reaches ``top_p`` (required, in
    ``(0, 1]``), at most ``router.k`` (:func:`top_p_routing`). Takes Gumbel noise on the ordering logits."""

    name: ClassVar[str] = "top_p"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED, plugin.TOKEN_CHOICE, plugin.SELECTION_LOGITS})
    dynamic_k: ClassVar[bool] = True
    top_p: float | None = None
    renormalize: bool = False
    routed_scaling: float = 1.0

    def __post_init__(self) -> None:
        p = self.top_p
        if p is None:
            plugin.fail("top_p", p, "required for router.kind='top_p'")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            plugin.fail("top_p", p, "must be in (0, 1]")
        check_weights("softmax", self.renormalize, self.routed_scaling)

    def route(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        noisy = call.selection_logits(logits)
        return top_p_routing(logits, self.top_p, call.k, renormalize=self.renormalize,
                             routed_scaling=self.routed_scaling, order_logits=None if noisy is logits else noisy)
