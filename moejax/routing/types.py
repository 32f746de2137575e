"""The typed values that routers produce and the layer reports.

``Routing`` (token choice) and ``ExpertChoiceRouting`` are what dispatch consumes; ``RoutingStats`` is
what the MoE layer returns next to its output so that the trainer can add auxiliary losses and log
statistics without global state. All three are ``flax.struct`` dataclasses, i.e. pytrees.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AuxLosses:
    """Auxiliary losses of one routing decision (scalars, not yet weighted).

    load_balance: Switch/GShard loss ``E * sum_e f_e * P_e``; 1.0 when perfectly balanced.
    z_loss: ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``.
    importance: Shazeer et al. (2017) ``CV(importance)^2`` of the per-expert sum of combine weights.
    """

    load_balance: jnp.ndarray
    z_loss: jnp.ndarray
    importance: jnp.ndarray

    @classmethod
    def zeros(cls) -> "AuxLosses":
        z = jnp.zeros((), jnp.float32)
        return cls(load_balance=z, z_loss=z, importance=z)


@struct.dataclass
class Routing:
    """Token-choice routing of ``T`` tokens to ``K`` of ``E`` experts.

    Attributes:
      expert_index: int32[T, K], the chosen expert of each slot.
      weight: float32[T, K], the combine weight of each slot (zero where not valid).
      valid: bool[T, K], whether the slot is used at all (dynamic-k routers leave slots empty).
      probs: float32[T, E], router probabilities used by the auxiliary losses.
      aux: the auxiliary losses of this decision.
      expert_load: float32[E], fraction of valid token copies sent to each expert (before any drop).
      entropy: float32[], mean entropy of ``probs`` per token (nats).
      confidence: float32[], mean of the largest probability per token.
      num_experts: ``E`` (static).
    """

    expert_index: jnp.ndarray
    weight: jnp.ndarray
    valid: jnp.ndarray
    probs: jnp.ndarray
    aux: AuxLosses
    expert_load: jnp.ndarray
    entropy: jnp.ndarray
    confidence: jnp.ndarray
    num_experts: int = struct.field(pytree_node=False)

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
class ExpertChoiceRouting:
    """Expert-choice routing (Zhou et al. 2022): each of ``E`` experts takes ``C`` tokens.

    Attributes:
      token_index: int32[E, C], the token in each slot of each expert.
      weight: float32[E, C], the combine weight of each slot.
      valid: bool[E, C], whether the slot is used; used slots come first in each row.
      probs: float32[T, E], token-to-expert probabilities (softmax over experts).
      aux: the auxiliary losses (only the z-loss is meaningful: the load is balanced by construction).
      expert_load: float32[E], fraction of used slots per expert.
      entropy, confidence: as in :class:`Routing`.
      num_tokens: ``T`` (static).
    """

    token_index: jnp.ndarray
    weight: jnp.ndarray
    valid: jnp.ndarray
    probs: jnp.ndarray
    aux: AuxLosses
    expert_load: jnp.ndarray
    entropy: jnp.ndarray
    confidence: jnp.ndarray
    num_tokens: int = struct.field(pytree_node=False)

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
      aux: the unweighted auxiliary losses.
      dropped_fraction: float32[], fraction of valid token copies that found no expert slot
        (capacity overflow); for expert choice, the fraction of tokens no expert took.
      expert_load: float32[E], fraction of processed token copies per expert (after drops).
      router_entropy: float32[], mean router entropy per token.
      router_confidence: float32[], mean largest router probability per token.
      experts_per_token: float32[], mean number of experts that processed each token.
      capacity: float32[], the expert capacity ``C`` used (equal to ``T`` when unlimited or dropless).
    """

    aux: AuxLosses
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
        return cls(aux=AuxLosses.zeros(), dropped_fraction=zero, expert_load=jnp.ones((1,), jnp.float32),
                   router_entropy=zero, router_confidence=one, experts_per_token=one, capacity=zero)
