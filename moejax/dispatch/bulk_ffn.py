"""The whole expert FFN in ``bulk``'s layout: one custom VJP from sorted rows to sorted rows.

``gmm='bulk'`` (:mod:`moejax.dispatch.padded_gmm`) copies rows from expert-sorted order into its layout and
back around *each* matmul, so an MLP expert pays four ``[M, *]`` row copies forward and four backward, two of
them at the hidden width ``F``. Here the layout is entered once and left once:

* the bulk slabs ``[E, cb, D]`` (the first ``cb = M / E`` rows of every group) go through the expert function
  ``vmap``-ed over the experts: batched matmuls, the activation applied to the slabs in place;
* the overflow of over-loaded experts goes through the expert function block by block (``tb`` rows of one
  group), inside a loop whose trip count is the number of non-empty blocks; each block reads its rows from the
  sorted input and writes its outputs to the sorted result directly (no static overflow buffer). With several
  tiles (``tile=(128, 32)``, :func:`overflow_blocks`) each group's overflow is cut into whole blocks of the first
  tile, what is left into blocks of the next, one loop per tile: a skewed expert's long overflow costs few
  iterations, a mildly over-loaded expert's few rows little padding;
* the backward pass runs the slabs' VJP (residuals saved by the forward pass) and, for each overflow block,
  recomputes the block's forward and adds its parameter gradients into the expert's slot.

Rows past all groups give zero outputs and zero input gradients; an expert with no rows gets exactly zero
parameter gradients (its slab rows are zero inputs with zero cotangents). The expert function must treat rows
independently (any FFN does). Measured against ``bulk`` as a gmm in ``benchmarks/results/``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from moejax.dispatch.padded_gmm import bulk_rows, layout, reduce_like, rows_or_zero, vary_like

ExpertFn = Callable[[Any, jax.Array], jax.Array]     # (one expert's params, rows [R, D]) -> [R, D_out]


def _expert(params: Any, g: jax.Array) -> Any:
    return jax.tree.map(lambda p: p[g], params)


class OverflowBlocks(NamedTuple):
    """One level of overflow blocks, all of ``tb`` rows: src int32[B * tb], the sorted row of each block row (``M``
    for a gap row); group int32[B], each block's expert; count int32[], the blocks that hold rows (a prefix)."""

    src: jax.Array
    group: jax.Array
    count: jax.Array


def overflow_blocks(group_sizes: jax.Array, m: int, cb: int, tiles: tuple[int, ...]) -> list[OverflowBlocks]:
    """The rows of each group past its first ``cb`` cut into blocks of ``tiles[0]`` rows, what is left into blocks of
    ``tiles[1]``, ..., the last level padding each group's remainder up to a whole block of ``tiles[-1]`` rows.

    ``tiles`` is decreasing: big blocks take the long overflow of a skewed expert in few iterations, the last, small
    tile bounds the padding of the short ones. One level is the single tile of :func:`padded_gmm.layout`.
    """
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    first = jnp.cumsum(sizes) - sizes + cb                       # sorted row of each group's first overflow row
    rest = jnp.maximum(sizes - cb, 0)
    levels, prev = [], None
    for i, tb in enumerate(tiles):
        last = i == len(tiles) - 1
        n = (rest + tb - 1) // tb if last else rest // tb
        taken = jnp.minimum(n * tb, rest)
        # Static bound on the blocks: every level holds at most M - cb rows; the last also pads each group by < tb
        # rows, and after a level of tile T every group has fewer than T rows left.
        bound = -(-max(m - cb, 0) // tb) + e - 1 if last else max(m - cb, 0) // tb
        if last and prev is not None:
            bound = min(bound, e * -(-(prev - 1) // tb))
        bound = max(bound, 1)
        ends = jnp.cumsum(n)
        group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(bound, dtype=jnp.int32), side="right"),
                            e - 1).astype(jnp.int32)
        q = jnp.arange(bound * tb, dtype=jnp.int32)
        g = group[q // tb]
        within = q - (ends[g] - n[g]) * tb
        src = jnp.where((q // tb < ends[-1]) & (within < taken[g]), first[g] + within, m).astype(jnp.int32)
        levels.append(OverflowBlocks(src, group, ends[-1]))
        first, rest, prev = first + taken, rest - taken, tb
    return levels


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bulk_ffn(x, params, group_sizes, expert_fn, tiles, cb):
    return _forward(x, params, group_sizes, expert_fn, tiles, cb)[0]


def _forward(x, params, group_sizes, expert_fn, tiles, cb):
    m, e = x.shape[0], group_sizes.shape[0]
    lay = layout(group_sizes, m, tiles[-1], cb)                  # the slabs (its own overflow part is unused)
    slabs = rows_or_zero(x, lay.src[:e * cb]).reshape(e, cb, x.shape[1])
    y_slabs, slab_vjp = jax.vjp(jax.vmap(expert_fn), params, slabs)
    y = rows_or_zero(y_slabs.reshape(e * cb, y_slabs.shape[-1]), lay.dst)   # overflow, past-all rows: 0
    levels = overflow_blocks(group_sizes, m, cb, tiles)
    for tb, lev in zip(tiles, levels):
        def block(i, y, tb=tb, lev=lev):
            idx = jax.lax.dynamic_slice_in_dim(lev.src, i * tb, tb)  # sorted rows of block i; M marks a gap row
            out = expert_fn(_expert(params, lev.group[i]), rows_or_zero(x, idx))
            return y.at[idx].set(out.astype(y.dtype), mode="drop")

        y = jax.lax.fori_loop(0, lev.count, block, y)
    return y, (x, params, lay, levels, slab_vjp)


def _bwd(expert_fn, tiles, cb, res, dy):
    x, params, lay, levels, slab_vjp = res
    e = jax.tree.leaves(params)[0].shape[0]
    d_params, d_slabs = slab_vjp(rows_or_zero(dy, lay.src[:e * cb]).reshape(e, cb, dy.shape[1]))
    dx = rows_or_zero(d_slabs.reshape(e * cb, x.shape[1]), lay.dst)
    carry = (jax.tree.map(lambda d, p: vary_like(d, x, dy, p), d_params, params), vary_like(dx, x, dy))
    for tb, lev in zip(tiles, levels):
        def block(i, carry, tb=tb, lev=lev):
            d_params, dx = carry
            idx = jax.lax.dynamic_slice_in_dim(lev.src, i * tb, tb)
            g = lev.group[i]
            _, block_vjp = jax.vjp(expert_fn, _expert(params, g), rows_or_zero(x, idx))
            d_expert, d_rows = block_vjp(rows_or_zero(dy, idx))
            d_params = jax.tree.map(lambda acc, d: acc.at[g].add(d.astype(acc.dtype)), d_params, d_expert)
            return d_params, dx.at[idx].set(d_rows.astype(dx.dtype), mode="drop")

        carry = jax.lax.fori_loop(0, lev.count, block, carry)
    d_params, dx = carry
    d_params = jax.tree.map(reduce_like, d_params, params)
    return reduce_like(dx, x), d_params, None


_bulk_ffn.defvjp(_forward, _bwd)


def bulk_ffn(x: jax.Array, params: Any, group_sizes: jax.Array, expert_fn: ExpertFn, *,
             tile: int | Sequence[int] = 64, bulk: int | None = None) -> jax.Array:
    """``expert_fn`` of expert ``e`` applied to group ``e`` of the sorted rows ``x[M, D]`` -> ``[M, D_out]``.

    params: a pytree of stacked ``[E, ...]`` parameters (``expert_fn`` gets one expert's slice); group_sizes:
    int[E], contiguous groups, rows at or past their sum give zeros. ``tile``: rows of an overflow block, or a
    decreasing sequence of them (:func:`overflow_blocks`: big blocks first, the remainder in smaller ones);
    ``bulk``: slab rows per expert (default ``M / E``, as ``gmm='bulk'``).
    """
    m, e = x.shape[0], group_sizes.shape[0]
    if x.ndim != 2:
        raise ValueError(f"x: expected sorted rows [M, D], got shape {x.shape}")
    leaves = jax.tree.leaves(params)
    if not leaves or any(p.shape[:1] != (e,) for p in leaves):
        raise ValueError(f"params: every leaf must be stacked over the {e} experts of group_sizes, got "
                         f"{[p.shape for p in leaves]}")
    tiles = (tile,) if isinstance(tile, int) else tuple(tile)
    if not tiles or any(not isinstance(t, int) or t < 1 for t in tiles) or list(tiles) != sorted(tiles, reverse=True):
        raise ValueError(f"tile={tile}: expected a positive int or a decreasing sequence of them")
    if m == 0:
        return expert_fn(_expert(params, 0), x)
    cb = bulk_rows(m, e) if bulk is None else int(bulk)
    tiles = tuple(dict.fromkeys(max(1, min(t, m)) for t in tiles))   # clipped to M, duplicates merged
    return _bulk_ffn(x, params, group_sizes.astype(jnp.int32), expert_fn, tiles, cb)


__all__ = ["ExpertFn", "OverflowBlocks", "bulk_ffn", "overflow_blocks"]
