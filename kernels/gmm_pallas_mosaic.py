"""Grouped matmul (``gmm``) and its transpose (``tgmm``) as Pallas kernels over (group, row-tile) work items.

Rows of ``lhs[M, K]`` come in contiguous groups of ``group_sizes[E]`` rows (``s_e`` the exclusive prefix
sum); group ``e`` is multiplied by ``rhs[e]``. Rows at or past ``sum(group_sizes)`` belong to no group.

The grid walks *work items*: every (row tile, group) pair that overlaps, in row order. A tile that straddles
a group boundary is visited once per group, each visit masked to that group's rows; a group spanning many
tiles is visited once per tile. There are at most ``ceil(M / tm) + E - 1`` items, a static bound, so the
grid is static; items past the real count repeat the last tile with an empty row range and do nothing.
Consecutive items that touch the same output block keep it resident (the Pallas pipeline only writes a
block back when its index changes), which is what lets straddling visits accumulate into one tile.

The kernels use the TPU grid spec (scalar prefetch of the work-item tables), the layout megablox uses.
They are tested in interpret mode on CPU, and their Mosaic (TPU) lowering is tested on CPU by lowering for
``tpu`` (``tests/test_kernel_lowering.py``: the kernel bodies become Mosaic MLIR that passes its verifier); they
have never been compiled by the TPU compiler nor run on a TPU here. Pallas' GPU lowerings refuse scalar
prefetch, so GPU has its own Triton kernels (:mod:`moejax.kernels.gmm_pallas_triton`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Tiling = tuple[int, int, int]
DEFAULT_TILING: Tiling = (128, 128, 128)


class WorkItems(NamedTuple):
    """int32 tables over the W = num_tiles + E - 1 work items (all of shape [W]).

    tile: the row tile of the item; group: its group; lo/hi: the absolute row range ``[lo, hi)`` the item
    covers (empty for padding items); num_active: int32[], how many items are real.
    """

    tile: jax.Array
    group: jax.Array
    lo: jax.Array
    hi: jax.Array
    num_active: jax.Array


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def varying_axes(*operands: jax.Array) -> frozenset:
    """The manual mesh axes (``shard_map`` with check_vma) along which any operand varies; empty outside one."""
    return frozenset().union(*(jax.typeof(a).mat.varying for a in operands))


def reduce_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """A custom VJP's cotangent summed over the manual mesh axes it varies along and its primal does not: the
    transpose of the implicit broadcast of an invariant primal (weights replicated over ``data`` inside
    ``shard_map``), which autodiff adds by itself and a hand-written backward must. Outside ``shard_map``: unchanged."""
    extra = varying_axes(grad) - varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _out_shape(shape: tuple[int, ...], dtype, interpret: bool, *operands: jax.Array) -> jax.ShapeDtypeStruct:
    """The pallas_call result type of every kernel file. Under ``shard_map`` (check_vma) it must name the mesh axes
    the result varies along: those of any operand (the expert-parallel dispatch calls these kernels per device)."""
    varying = varying_axes(*operands)
    if interpret and varying:
        # jax 0.10.2's interpreter scans over the grid with a carry that loses these axes and fails in tracing.
        raise ValueError(f"interpret: the Pallas interpreter cannot run inside shard_map(check_vma=True) on operands "
                         f"varying along {sorted(varying)}; use check_vma=False or a non-Pallas path")
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def work_items(group_sizes: jax.Array, num_tiles: int, tm: int) -> WorkItems:
    """The (row tile, group) pairs that overlap, in row order, padded to the static bound ``num_tiles + E - 1``.

    group_sizes: int32[E]. Empty groups that sit inside a tile may appear as items with an empty range.
    """
    e = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    total = ends[-1]
    tile_lo = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    tile_last_row = jnp.minimum(tile_lo + tm, total) - 1
    first = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)    # first group ending past the tile start
    last = jnp.searchsorted(ends, tile_last_row, side="right").astype(jnp.int32)
    per_tile = jnp.where(tile_lo < total, last - first + 1, 0)
    item_end = jnp.cumsum(per_tile)
    num_active = item_end[-1]
    w = num_tiles + e - 1
    item = jnp.arange(w, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_tiles - 1).astype(jnp.int32)
    group = jnp.clip(first[tile] + item - (item_end[tile] - per_tile[tile]), 0, e - 1).astype(jnp.int32)
    active = item < num_active
    # Padding items sit on the last real item's tile and group, so that no output block is revisited
    # out of order; their empty row range makes them no-ops.
    last_item = jnp.maximum(num_active - 1, 0)
    tile = jnp.where(active, tile, tile[last_item])
    group = jnp.where(active, group, group[last_item])
    lo = jnp.maximum(starts[group], tile * tm)
    hi = jnp.minimum(ends[group], tile * tm + tm)
    lo = jnp.where(active, lo, 0)
    hi = jnp.where(active, jnp.maximum(hi, lo), 0)
    return WorkItems(tile, group, lo.astype(jnp.int32), hi.astype(jnp.int32), num_active.astype(jnp.int32))


def _check(lhs: jax.Array, rhs_groups: int, k2: int, group_sizes: jax.Array, name: str) -> None:
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
    if lhs.shape[1] != k2:
        raise ValueError(f"{name}: lhs[M, K] has K={lhs.shape[1]} but the other operand has K={k2}")
    if group_sizes.shape != (rhs_groups,):
        raise ValueError(f"{name}: group_sizes must have shape ({rhs_groups},), got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be integer, got {group_sizes.dtype}")


def _tiles(tiling: Tiling, m: int, k: int, n: int) -> tuple[int, int, int]:
    if len(tiling) != 3 or any(int(t) < 1 for t in tiling):
        raise ValueError(f"tiling={tiling}: must be three positive ints (tm, tk, tn)")
    # Tiles larger than the (8-aligned) dimension only add padding.
    return tuple(min(int(t), _round_up(d, 8)) for t, d in zip(tiling, (m, k, n)))


def _row_mask(lo: jax.Array, hi: jax.Array, tile: jax.Array, tm: int, width: int) -> jax.Array:
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= lo) & (rows < hi)


def _precision(dtype) -> jax.lax.Precision | None:
    """The kernels' dot precision: jax's default matmul precision config for 32-bit operands (None), DEFAULT for
    16-bit ones, which are exact in one bf16 pass. Mosaic refuses a 16-bit matmul at fp32 contract precision ("Bad
    lhs type"; found compiling for TPU with :mod:`moejax.aot` under ``jax_default_matmul_precision=highest``)."""
    return jax.lax.Precision.DEFAULT if jnp.dtype(dtype).itemsize < 4 else None


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int, tn: int):
    w, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[0], preferred_element_type=jnp.float32,
                            precision=_precision(lhs_ref.dtype))

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        mask = _row_mask(lo_ref[w], hi_ref[w], tile_ref[w], tm, tn)
        # Rows of other groups keep what their own visit wrote (the block stays resident between visits).
        out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm_mosaic(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_TILING,
               interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """Forward grouped matmul kernel, no VJP: lhs[M, K] @ rhs[E, K, N] by groups -> [M, N].

    Accumulates in float32; the result has ``preferred_element_type`` (default ``lhs.dtype``).
    """
    m, k = lhs.shape
    e, k2, n = rhs.shape
    _check(lhs, e, k2, group_sizes, "gmm")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = _tiles(tiling, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    rhs = rhs.astype(lhs.dtype)
    # Zero padding of K is exact; padded rows and columns are cut off below.
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    rhs_p = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    items = work_items(group_sizes, mp // tm, tm)
    num_items = items.tile.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(np_ // tn, num_items, kp // tk),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda j, w, kk, tile, group, lo, hi: (tile[w], kk)),
            pl.BlockSpec((1, tk, tn), lambda j, w, kk, tile, group, lo, hi: (group[w], kk, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda j, w, kk, tile, group, lo, hi: (tile[w], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, tn=tn),
        out_shape=_out_shape((mp, np_), out_dtype, interpret, lhs_p, rhs_p),
        grid_spec=grid_spec,
        interpret=interpret,
        name="moejax_gmm",
    )(items.tile, items.group, items.lo, items.hi, lhs_p, rhs_p)
    # Tiles past the last group are never visited, so their memory is whatever the buffer held.
    total = jnp.sum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    return jnp.where(rows < total, out[:m, :n], jnp.zeros((), out_dtype))


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, tm: int, tk: int,
                 tn: int):
    w = pl.program_id(2)
    last = pl.num_programs(2) - 1
    group = group_ref[w]
    prev_group = group_ref[jnp.maximum(w - 1, 0)]
    next_group = group_ref[jnp.minimum(w + 1, last)]

    @pl.when((w == 0) | (group != prev_group))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    lhs = jnp.where(_row_mask(lo_ref[w], hi_ref[w], tile_ref[w], tm, tk), lhs_ref[...], 0)
    # [tm, tk]^T @ [tm, tn]: contract the row axis of both operands.
    acc_ref[...] += jax.lax.dot_general(lhs, grad_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32, precision=_precision(lhs.dtype))

    @pl.when((w == last) | (group != next_group))
    def _():
        out_ref[0] = acc_ref[...].astype(out_ref.dtype)


def tgmm_mosaic(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_TILING,
                interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """Transposed grouped matmul kernel: ``out[e] = lhs[group e]^T @ grad[group e]``; lhs[M, K], grad[M, N] -> [E, K, N].

    Groups with no rows come out exactly zero. Rows past ``sum(group_sizes)`` are ignored.
    """
    m, k = lhs.shape
    m2, n = grad.shape
    e = group_sizes.shape[0]
    if m2 != m:
        raise ValueError(f"tgmm: lhs[M, K] has M={m} but grad[M, N] has M={m2}")
    _check(lhs, e, k, group_sizes, "tgmm")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((e, k, n), out_dtype)
    tm, tk, tn = _tiles(tiling, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    grad_p = jnp.pad(grad.astype(lhs.dtype), ((0, mp - m), (0, np_ - n)))
    items = work_items(group_sizes, mp // tm, tm)
    num_items = items.tile.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(kp // tk, np_ // tn, num_items),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda i, j, w, tile, group, lo, hi: (tile[w], i)),
            pl.BlockSpec((tm, tn), lambda i, j, w, tile, group, lo, hi: (tile[w], j)),
        ],
        out_specs=pl.BlockSpec((1, tk, tn), lambda i, j, w, tile, group, lo, hi: (group[w], i, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        out_shape=_out_shape((e, kp, np_), out_dtype, interpret, lhs_p, grad_p),
        grid_spec=grid_spec,
        interpret=interpret,
        name="moejax_tgmm",
    )(items.tile, items.group, items.lo, items.hi, lhs_p, grad_p)
    # Empty groups may never be visited, so their block holds whatever the buffer held: make them exactly zero.
    nonempty = group_sizes > 0
    return jnp.where(nonempty[:, None, None], out[:, :k, :n], jnp.zeros((), out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type):
    return gmm_mosaic(lhs, rhs, group_sizes, tiling=tiling, interpret=interpret,
                      preferred_element_type=preferred_element_type)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type):
    out = _gmm(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, interpret, preferred_element_type, res, g):
    del preferred_element_type
    lhs, rhs, group_sizes = res
    # d lhs: each row's cotangent times its group's weight transposed; rows past all groups get zeros.
    d_lhs = gmm_mosaic(g.astype(lhs.dtype), jnp.swapaxes(rhs, 1, 2).astype(lhs.dtype), group_sizes,
                       tiling=(tiling[0], tiling[2], tiling[1]), interpret=interpret,
                       preferred_element_type=lhs.dtype)
    d_rhs = tgmm_mosaic(lhs, g.astype(lhs.dtype), group_sizes, tiling=tiling, interpret=interpret,
                        preferred_element_type=rhs.dtype)
    return reduce_like(d_lhs, lhs), reduce_like(d_rhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_TILING,
        interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """Grouped matmul with a custom VJP: lhs[M, K] @ rhs[E, K, N] by contiguous row groups -> [M, N].

    Args:
      lhs: [M, K] rows sorted by group; rhs: [E, K, N]; group_sizes: int[E], ``sum <= M``.
      tiling: ``(tm, tk, tn)`` block sizes (clipped to the 8-aligned dimensions; M, K, N need not divide).
      interpret: run the Pallas interpreter (the only way on CPU).
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is always float32.

    Returns:
      [M, N]; rows at or past ``sum(group_sizes)`` are zero. Gradients: ``d lhs = gmm(g, rhs^T)``,
      ``d rhs = tgmm(lhs, g)`` (exactly zero for empty groups).
    """
    ptype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return _gmm(lhs, rhs, group_sizes, tuple(int(t) for t in tiling), bool(interpret), ptype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_TILING,
         interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """Transposed grouped matmul lhs[M, K], grad[M, N] -> [E, K, N] (see :func:`tgmm_mosaic`)."""
    return tgmm_mosaic(lhs, grad, group_sizes, tiling=tuple(int(t) for t in tiling), interpret=interpret,
                       preferred_element_type=preferred_element_type)


# The forward kernels' former names (``moejax.kernels.gmm_pallas`` is public).
gmm_pallas = gmm_mosaic
tgmm_pallas = tgmm_mosaic
