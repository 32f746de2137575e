"""``dispatch.gmm=blocked``: XLA, a scan over (row tile, group) work items; ``auto`` on platforms without a default.

Exact, no E-times work: ``(M + E * tile) * K * N`` multiply-adds. Gradients come from autodiff of the scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend
from moejax.dispatch.gmm_args import check_gmm_args
from moejax.dispatch.padded_gmm import vary_like


def work_items(group_sizes: jax.Array, num_tiles: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Enumerates (row tile, group) pairs that overlap, padded to the static bound ``num_tiles + E - 1``.

    Returns int32 ``tile_of_item[W]``, ``group_of_item[W]`` and bool ``active[W]``.
    """
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    lo = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    first = jnp.searchsorted(ends, lo, side="right")                 # first group ending after the tile start
    last = jnp.minimum(jnp.searchsorted(ends, lo + tile - 1, side="right"), e - 1)
    per_tile = jnp.where(first < e, last - first + 1, 0)
    item_end = jnp.cumsum(per_tile)
    w = num_tiles + e - 1
    item = jnp.arange(w, dtype=jnp.int32)
    tile_of = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_tiles - 1)
    group_of = first[tile_of] + item - (item_end[tile_of] - per_tile[tile_of])
    active = item < item_end[-1]
    return tile_of.astype(jnp.int32), jnp.clip(group_of, 0, e - 1).astype(jnp.int32), active


def gmm_blocked(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128) -> jax.Array:
    """Grouped matmul as a scan over (row tile, group) work items.

    Each of the at most ``ceil(M / tile) + E - 1`` items multiplies one ``[tile, K]`` row block, masked to
    the rows of its group, by that group's ``[K, N]`` weight.
    """
    m, k, e, n = check_gmm_args(lhs, rhs, group_sizes)
    if m == 0:
        return jnp.zeros((0, n), lhs.dtype)
    tm = min(tile, m)
    num_tiles = -(-m // tm)
    padded = jnp.pad(lhs, ((0, num_tiles * tm - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tile_of, group_of, active = work_items(group_sizes, num_tiles, tm)
    rows_in_tile = jnp.arange(tm, dtype=jnp.int32)

    def step(out, item):
        t, g, on = item
        rows = t * tm + rows_in_tile
        mask = (rows >= starts[g]) & (rows < ends[g]) & on
        x = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(padded, t * tm, tm), 0)
        y = jnp.dot(x, rhs[g].astype(lhs.dtype), preferred_element_type=jnp.float32)
        block = jax.lax.dynamic_slice_in_dim(out, t * tm, tm)
        return jax.lax.dynamic_update_slice_in_dim(out, block + y, t * tm, axis=0), None

    init = vary_like(jnp.zeros((num_tiles * tm, n), jnp.float32), lhs, rhs)
    out, _ = jax.lax.scan(step, init, (tile_of, group_of, active))
    return out[:m].astype(lhs.dtype)


BACKEND = register_gmm_backend(GmmBackend("blocked", gmm_blocked, takes_tile=True))
