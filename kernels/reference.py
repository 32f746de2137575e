"""Pure-jnp references for the kernels, with the kernels' signatures (tiling and interpret are accepted and ignored).

Written with per-group masks or one-hot matrices over all rows: slow, obviously correct, differentiable by
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


# ------------------------------------------- capacity dispatch / combine (kernels/capacity_pallas_mosaic.py)
# One-hot matrices over all rows (R or S times the work): every entry outside [0, R) has an all-zero one-hot row,
# which is the kernels' "out of range contributes nothing" rule.


def gather_rows(x: jax.Array, src: jax.Array, scale: jax.Array, *, tiling=None, interpret: bool = False) -> jax.Array:
    """x[T, D], src int[R], scale float[R] -> x.dtype[R, D]: ``out[r] = scale[r] * x[src[r]]``, zero if out of range."""
    del tiling, interpret
    hot = jax.nn.one_hot(src, x.shape[0], dtype=jnp.float32)                                  # [R, T]
    out = jnp.einsum("r,rt,td->rd", scale.astype(jnp.float32), hot, x.astype(jnp.float32))
    return out.astype(x.dtype)


def gather_sum(y: jax.Array, idx: jax.Array, w: jax.Array, *, tiling=None, interpret: bool = False,
               preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """y[R, D], idx int[T, K], w float[T, K] -> [T, D]: ``out[t] = sum_k w[t, k] * y[idx[t, k]]`` (in float32)."""
    del tiling, interpret
    hot = jax.nn.one_hot(idx, y.shape[0], dtype=jnp.float32)                                  # [T, K, R]
    out = jnp.einsum("tk,tkr,rd->td", w.astype(jnp.float32), hot, y.astype(jnp.float32))
    return out.astype(preferred_element_type or y.dtype)


def capacity_dispatch(x: jax.Array, slot_of_copy: jax.Array, num_slots: int, *, tiling=None,
                      interpret: bool = False) -> jax.Array:
    """x[T, D], slot_of_copy int[T, K] -> [S, D]: slot ``s`` holds the sum of the tokens whose copies point at it."""
    del tiling, interpret
    hot = jax.nn.one_hot(slot_of_copy, num_slots, dtype=jnp.float32)                         # [T, K, S]
    return jnp.einsum("tks,td->sd", hot, x.astype(jnp.float32)).astype(x.dtype)


def capacity_combine(y: jax.Array, slot_of_copy: jax.Array, weight: jax.Array, *, tiling=None,
                     interpret: bool = False) -> jax.Array:
    """y[S, D], slot_of_copy int[T, K], weight[T, K] -> [T, D]: ``sum_k weight[t, k] * y[slot_of_copy[t, k]]``."""
    del tiling, interpret
    hot = jax.nn.one_hot(slot_of_copy, y.shape[0], dtype=jnp.float32)                       # [T, K, S]
    out = jnp.einsum("tk,tks,sd->td", weight.astype(jnp.float32), hot, y.astype(jnp.float32))
    return out.astype(y.dtype)
