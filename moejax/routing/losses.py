"""Auxiliary losses and routing statistics, as pure functions of router outputs.

Shapes follow the axis vocabulary: ``T`` tokens, ``E`` experts, ``K`` slots per token.
Counting quantities (``f_e``) carry no gradient; probabilities and weights do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_fraction(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: fraction of the valid token copies assigned to each expert (sums to 1, or 0 if none).

    Args:
      expert_index: int32[..., K] expert of each slot.
      valid: bool[..., K] whether the slot is used.
    """
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * valid[..., None]
    counts = onehot.reshape(-1, num_experts).sum(0)
    return counts / jnp.maximum(counts.sum(), 1.0)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, valid: jax.Array) -> jax.Array:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of valid token copies (all K choices, before capacity drops) routed to
    expert ``e``; ``P_e`` the mean router probability of ``e``. Equals 1.0 under uniform routing.

    Args:
      probs: float32[T, E]; expert_index: int32[T, K]; valid: bool[T, K].
    """
    num_experts = probs.shape[-1]
    f = jax.lax.stop_gradient(expert_fraction(expert_index, valid, num_experts))
    p = probs.astype(jnp.float32).mean(0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits_t)^2``. logits: float32[T, E]."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z * z)


def importance_loss(weight: jax.Array, expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """Shazeer et al. (2017) importance loss ``CV(importance)^2``.

    ``importance_e`` is the sum over tokens of the combine weights given to expert ``e``;
    ``CV^2 = Var / Mean^2`` (population variance). Zero when all experts get equal total weight.

    Args:
      weight: float32[T, K]; expert_index: int32[T, K]; valid: bool[T, K].
    """
    w = jnp.where(valid, weight, 0.0).astype(jnp.float32)
    importance = jnp.einsum("tk,tke->e", w, jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32))
    mean = importance.mean()
    return importance.var() / (mean * mean + 1e-10)


def mean_entropy(probs: jax.Array) -> jax.Array:
    """Mean per-token entropy in nats of float32[T, E] probabilities."""
    p = probs.astype(jnp.float32)
    return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


def mean_confidence(probs: jax.Array) -> jax.Array:
    """Mean over tokens of the largest router probability. probs: float32[T, E]."""
    return jnp.mean(jnp.max(probs.astype(jnp.float32), axis=-1))


def aux_free_bias_update(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: ``b_e += rate * sign(mean(load) - load_e)``.

    Overloaded experts get a lower selection bias, underloaded ones a higher one. The trainer applies
    this after each step to the ``moe_state/selection_bias`` variable of every layer.

    Args:
      bias: float32[E] current selection bias; expert_load: float32[E] load measured in the step.
    """
    load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
    return bias + rate * jnp.sign(load.mean() - load)
