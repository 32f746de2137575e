"""Pure-jnp references for the kernels, with the kernels' signatures (tiling and interpret are accepted and ignored).

Written with per-group masks over all rows (E times the work): slow, obviously correct, differentiable by
plain autodiff. The kernel tests compare values and gradients against these.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _group_masks(group_sizes: jax.Array, m: int) -> jax.Array:
    """bool[E, M]: row r belongs to group e."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    rows = jnp.arange(m, dtype=jnp.int32)
    return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling=None, interpret: bool = False,
        preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """lhs[M, K], rhs[E, K, N], group_sizes[E] -> [M, N]: ``out[r] = lhs[r] @ rhs[group(r)]``, zero past all groups."""
    del tiling, interpret
    masks = _group_masks(group_sizes, lhs.shape[0])
    per_group = jnp.einsum("mk,ekn->emn", lhs, rhs.astype(lhs.dtype), preferred_element_type=jnp.float32)
    out = jnp.sum(jnp.where(masks[:, :, None], per_group, 0.0), axis=0)
    return out.astype(preferred_element_type or lhs.dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tiling=None, interpret: bool = False,
         preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """lhs[M, K], grad[M, N], group_sizes[E] -> [E, K, N]: ``out[e] = lhs[rows of e]^T @ grad[rows of e]``."""
    del tiling, interpret
    masks = _group_masks(group_sizes, lhs.shape[0])
    masked = jnp.where(masks[:, :, None], lhs[None], 0)
    out = jnp.einsum("emk,mn->ekn", masked, grad.astype(lhs.dtype), preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)
