"""Grouping token copies by expert: the one sort that capacity and dropless dispatch share."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_by_expert(expert: jax.Array, valid: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stable sort of N token copies by expert; invalid copies go last.

    Args:
      expert: int32[N] expert of each copy, in priority order (earlier copies rank first).
      valid: bool[N] whether the copy is routed at all.
      num_experts: E.

    Returns:
      order: int32[N], copy indices sorted by expert (ties keep input order), invalid copies last.
      group_sizes: int32[E], valid copies per expert.
      rank: int32[N], each copy's position among the copies of its expert (0-based, in input order);
        meaningless for invalid copies.
    """
    n = expert.shape[0]
    key = jnp.where(valid, expert, num_experts).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.bincount(key, length=num_experts + 1).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    sorted_rank = jnp.arange(n, dtype=jnp.int32) - starts[key[order]]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(sorted_rank, unique_indices=True)
    return order, counts[:num_experts], rank


def inverse_permutation(order: jax.Array) -> jax.Array:
    """int32[N] ``inv`` with ``inv[order[i]] = i``."""
    n = order.shape[0]
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
