"""The typed values that routers produce and the layer reports.

``Routing`` (token choice) and ``ExpertChoiceRouting`` are the decision only (choices, combine weights, which
slots are used, and the router's probabilities), what dispatch consumes; their per-expert counts, load, entropy
and confidence are computed from those on demand. ``RoutingStats`` is what the MoE layer returns next to its output
(its weighted losses by name and its statistics, built once by :func:`routing_stats` from the routing and the
dispatch's counts), so that the trainer adds the losses and logs the statistics without global state. All three
are ``flax.struct`` dataclasses, i.e. pytrees.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from moejax.routing.losses import expert_counts, expert_weight_sums, fractions, mean_confidence, mean_entropy


class _FromDecision:
    """What both routing values derive from their decision: per-expert load, entropy and confidence."""

    probs: jnp.ndarray

    def expert_counts(self) -> jnp.ndarray:
        raise NotImplementedError

    @property
    def expert_load(self) -> jnp.ndarray:
        """float32[E]: fraction of valid token copies sent to each expert (before any drop; 0 if none)."""
        return fractions(self.expert_counts())

    @property
    def entropy(self) -> jnp.ndarray:
        """float32[]: mean entropy of ``probs`` per token (nats)."""
        return mean_entropy(self.probs)

    @property
    def confidence(self) -> jnp.ndarray:
        """float32[]: mean of the largest probability per token."""
        return mean_confidence(self.probs)


@struct.dataclass
class Routing(_FromDecision):
    """Token-choice routing of ``T`` tokens to ``K`` of ``E`` experts.

    Attributes:
      expert_index: int32[T, K], the chosen expert of each slot.
      weight: float32[T, K], the combine weight of each slot (zero where not valid).
      valid: bool[T, K], whether the slot is used at all (dynamic-k routers leave slots empty).
      probs: float32[T, E], the router's probabilities (used by the auxiliary losses and the statistics).
      num_experts: ``E`` (static).
    """

    expert_index: jnp.ndarray
    weight: jnp.ndarray
    valid: jnp.ndarray
    probs: jnp.ndarray
    num_experts: int = struct.field(pytree_node=False)

    def expert_counts(self) -> jnp.ndarray:
        """float32[E]: valid token copies sent to each expert (before any capacity drop)."""
        return expert_counts(self.expert_index, self.valid, self.num_experts)

    def expert_weight_sums(self) -> jnp.ndarray:
        """float32[E]: the combine weight each expert receives, summed over the tokens' valid slots."""
        return expert_weight_sums(self.weight, self.expert_index, self.valid, self.num_experts)


    @property
    def num_tokens(self) -> int:
        return self.expert_index.shape[0]

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    @property
    def experts_per_token(self) -> jnp.ndarray:
        """float32[], mean number of valid slots per token, before any capacity drop (dynamic-k routers)."""
        return self.valid.sum(-1).astype(jnp.float32).mean()


@struct.dataclass
class ExpertChoiceRouting(_FromDecision):
    """Expert-choice routing (Zhou et al. 2022): each of ``E`` experts takes ``C`` tokens.

    Attributes:
      token_index: int32[E, C], the token in each slot of each expert.
      weight: float32[E, C], the combine weight of each slot.
      valid: bool[E, C], whether the slot is used; used slots come first in each row.
      probs: float32[T, E], token-to-expert probabilities (softmax over experts).
      num_tokens: ``T`` (static).
    """

    token_index: jnp.ndarray
    weight: jnp.ndarray
    valid: jnp.ndarray
    probs: jnp.ndarray
    num_tokens: int = struct.field(pytree_node=False)

    def expert_counts(self) -> jnp.ndarray:
        """float32[E]: used slots per expert."""
        return self.valid.sum(-1).astype(jnp.float32)

    def expert_weight_sums(self) -> jnp.ndarray:
        """float32[E]: each expert's summed slot weights."""
        return jnp.where(self.valid, self.weight, 0.0).astype(jnp.float32).sum(-1)


    @property
    def num_experts(self) -> int:
        return self.token_index.shape[0]

    @property
    def capacity(self) -> int:
        return self.token_index.shape[1]


AnyRouting = Routing | ExpertChoiceRouting


@struct.dataclass
class RoutingStats:
    """What an MoE (or dense baseline) layer reports besides its output.

    Attributes:
      losses: ``{name: float32[]}`` the layer's auxiliary losses, already weighted by the plug-ins that own them
        (:mod:`moejax.routing.loss`); the trainer adds each to the objective. Empty for layers without a router.
      dropped_fraction: float32[], fraction of valid token copies that found no expert slot
        (capacity overflow); for expert choice, the fraction of tokens no expert took.
      expert_load: float32[E], fraction of processed token copies per expert (after drops).
      router_entropy: float32[], mean router entropy per token.
      router_confidence: float32[], mean largest router probability per token.
      experts_per_token: float32[], mean number of experts that processed each token.
      capacity: float32[], the expert capacity ``C`` used (equal to ``T`` when unlimited or dropless).
    """

    losses: dict[str, Any]
    dropped_fraction: jnp.ndarray
    expert_load: jnp.ndarray
    router_entropy: jnp.ndarray
    router_confidence: jnp.ndarray
    experts_per_token: jnp.ndarray
    capacity: jnp.ndarray

    @classmethod
    def dense(cls) -> "RoutingStats":
        """The statistics of a dense FFN: one expert that takes every token."""
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        return cls(losses={}, dropped_fraction=zero, expert_load=jnp.ones((1,), jnp.float32),
                   router_entropy=zero, router_confidence=one, experts_per_token=one, capacity=zero)
