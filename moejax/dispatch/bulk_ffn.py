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


# The measured layout rule of XLA:CPU (benchmarks/results/cpu_2026-12-01c_learned.md): with r = M / E rows per
# expert, slabs of r/2 rows when r >= AUTO_HALF_SLAB_ROWS (else r), and overflow tiles (r/2, r/8), at least MIN_TILE,
# from r = AUTO_LEVELS_ROWS on; below it (not measured) the previous default, full slabs and one tile of SMALL_TILE.
AUTO_HALF_SLAB_ROWS = 256
AUTO_LEVELS_ROWS = 128
MIN_TILE = 8
SMALL_TILE = 64


def layout_rule(rows_per_expert: int) -> tuple[float, tuple[int, ...]]:
    """``(slab fraction of M / E, decreasing overflow tiles)`` of ``tile='auto'`` for ``r = M / E`` rows per expert.

    Measured on XLA:CPU (learned router, SwiGLU, forward + backward, 2 cores): at r = 512 (T=2048, E=8, K=2) half
    slabs with tiles (256, 64) cost ~2% with balanced routing and gain ~30% under Zipf-skewed routing against the
    former default (full slabs, tile 64); at r = 128 (T=1024, E=64, K=8) half slabs lose 4-12% balanced, full slabs
    with tiles (64, 16) gain ~5%. Below r = 128 nothing was measured and the former default stays (one tile level
    also compiles faster: small models are the tests' and the notebooks').
    """
    r = max(int(rows_per_expert), 0)
    if r < AUTO_LEVELS_ROWS:
        return 1.0, (SMALL_TILE,)
    slab = 0.5 if r >= AUTO_HALF_SLAB_ROWS else 1.0
    tiles = tuple(dict.fromkeys(max(MIN_TILE, t) for t in (r // 2, r // 8)))
    return slab, tiles


def check_tile(tile: Any, where: str = "tile") -> None:
    """One-line ``ValueError`` naming ``where`` unless ``tile`` is ``'auto'``, a positive int or a non-empty strictly
    decreasing sequence of positive ints."""
    if tile == "auto" or (isinstance(tile, int) and not isinstance(tile, bool) and tile >= 1):
        return
    if isinstance(tile, (tuple, list)) and tile and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                                        for t in tile) \
            and all(a > b for a, b in zip(tile, tile[1:])):
        return
    raise ValueError(f"{where}={tile!r}: expected 'auto', a positive int or a strictly decreasing sequence of them")


def check_slab(slab: Any, where: str = "slab") -> None:
    """One-line ``ValueError`` naming ``where`` unless ``slab`` is ``'auto'`` or a number in (0, 1]."""
    if slab == "auto" or (isinstance(slab, (int, float)) and not isinstance(slab, bool) and 0 < slab <= 1):
        return
    raise ValueError(f"{where}={slab!r}: expected 'auto' or a fraction of M / E in (0, 1]")


def bulk_ffn(x: jax.Array, params: Any, group_sizes: jax.Array, expert_fn: ExpertFn, *,
             tile: int | Sequence[int] | str = 64, slab: float | str = "auto", bulk: int | None = None) -> jax.Array:
    """``expert_fn`` of expert ``e`` applied to group ``e`` of the sorted rows ``x[M, D]`` -> ``[M, D_out]``.

    params: a pytree of stacked ``[E, ...]`` parameters (``expert_fn`` gets one expert's slice); group_sizes:
    int[E], contiguous groups, rows at or past their sum give zeros. ``tile``: rows of an overflow block, a
    decreasing sequence of them (:func:`overflow_blocks`: big blocks first, the remainder in smaller ones), or
    ``'auto'`` (:func:`layout_rule`, slab included). ``slab``: slab rows per expert as a fraction of ``M / E``;
    ``'auto'``: the rule's when ``tile='auto'``, else 1 (``gmm='bulk'``'s layout). ``bulk``: slab rows, overriding
    ``slab``.
    """
    m, e = x.shape[0], group_sizes.shape[0]
    if x.ndim != 2:
        raise ValueError(f"x: expected sorted rows [M, D], got shape {x.shape}")
    leaves = jax.tree.leaves(params)
    if not leaves or any(p.shape[:1] != (e,) for p in leaves):
        raise ValueError(f"params: every leaf must be stacked over the {e} experts of group_sizes, got "
                         f"{[p.shape for p in leaves]}")
    check_tile(tile)
    check_slab(slab)
    if m == 0:
        return expert_fn(_expert(params, 0), x)
    rows = bulk_rows(m, e)
    rule_slab, rule_tiles = layout_rule(rows)
    if tile == "auto":
        tiles, fraction = rule_tiles, rule_slab if slab == "auto" else slab
    else:
        tiles, fraction = (tile,) if isinstance(tile, int) else tuple(tile), 1.0 if slab == "auto" else slab
    cb = int(rows * fraction) if bulk is None else int(bulk)
    tiles = tuple(dict.fromkeys(max(1, min(t, m)) for t in tiles))   # clipped to M, duplicates merged
    return _bulk_ffn(x, params, group_sizes.astype(jnp.int32), expert_fn, tiles, cb)


__all__ = ["ExpertFn", "OverflowBlocks", "bulk_ffn", "check_slab", "check_tile", "layout_rule", "overflow_blocks"]
