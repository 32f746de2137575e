"""Auxiliary losses and routing statistics, as pure functions of router outputs.

Shapes follow the axis vocabulary: ``T`` tokens, ``E`` experts, ``K`` slots per token.
Counting quantities (``f_e``) carry no gradient; probabilities and weights do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: the valid token copies assigned to each expert.

    Args:
      expert_index: int32[..., K] expert of each slot.
      valid: bool[..., K] whether the slot is used.
    """
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * valid[..., None]
    return onehot.reshape(-1, num_experts).sum(0)


def expert_weight_sums(weight: jax.Array, expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: the combine weight each expert receives, summed over the valid slots. Shapes [T, K]."""
    w = jnp.where(valid, weight, 0.0).astype(jnp.float32)
    return jnp.einsum("tk,tke->e", w, jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32))


def fractions(counts: jax.Array) -> jax.Array:
    """float32[E]: ``counts`` as fractions of their sum (all 0 when there is nothing to count)."""
    return counts / jnp.maximum(counts.sum(), 1.0)


def expert_fraction(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: fraction of the valid token copies assigned to each expert (sums to 1, or 0 if none).

    Args:
      expert_index: int32[..., K] expert of each slot.
      valid: bool[..., K] whether the slot is used.
    """
    return fractions(expert_counts(expert_index, valid, num_experts))


def balance_loss(fraction: jax.Array, probs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``E * sum_e w_e f_e P_e``: ``f`` float32[E] the load fractions (no gradient through them), ``P_e`` the mean
    of probs float32[T, E] over tokens, ``w`` float32[E] per-expert weights (default 1)."""
    f = jax.lax.stop_gradient(fraction)
    p = probs.astype(jnp.float32).mean(0)
    terms = f * p if weights is None else weights * f * p
    return probs.shape[-1] * jnp.sum(terms)


def cv_squared(x: jax.Array) -> jax.Array:
    """``Var / Mean^2`` (population variance) of float32[E]; 0 when all entries are equal."""
    mean = x.mean()
    return x.var() / (mean * mean + 1e-10)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, valid: jax.Array) -> jax.Array:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of valid token copies (all K choices, before capacity drops) routed to
    expert ``e``; ``P_e`` the mean router probability of ``e``. Equals 1.0 under uniform routing.

    Args:
      probs: float32[T, E]; expert_index: int32[T, K]; valid: bool[T, K].
    """
    return balance_loss(expert_fraction(expert_index, valid, probs.shape[-1]), probs)


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
    return cv_squared(expert_weight_sums(weight, expert_index, valid, num_experts))


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
