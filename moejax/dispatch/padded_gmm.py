"""Grouped matmul over tile-aligned padded groups: the XLA formulation for CPU.

Rows are copied (one gather) into a padded buffer in two regions:

* the *bulk*: ``E`` slabs of ``cb`` rows, slab ``e`` holding the first ``min(g_e, cb)`` rows of group ``e``
  (the rest of the slab is zero rows), multiplied by one batched matmul ``[E, cb, K] @ [E, K, N]``;
* the *overflow*: the remaining rows of each group, each group starting on a multiple of the tile ``tb``, so
  every ``[tb, K]`` block belongs to one group and needs no mask; a loop over the blocks that hold rows (a
  dynamic trip count, so the padding blocks of the static bound cost nothing) multiplies each by its
  group's weight, indexed in place (no ``[blocks, K, N]`` weight gather).

``cb = 0`` is the plain padded gmm (registered as ``padded``); ``cb ~ M / E`` (registered as ``bulk``) sends a
balanced routing through the batched matmul, which XLA:CPU runs much faster than many small block matmuls,
while skewed routings spill into the loop instead of being dropped. The MoE layer runs ``bulk``'s whole expert
FFN in this layout (:mod:`moejax.dispatch.bulk_ffn`); the gmm here serves everything else (expert
parallelism's local experts, custom expert functions). Bulk rows of an expert with fewer
than ``cb`` rows are zeros and still cost work: ``(E * cb + (overflow blocks) * tb) * K * N`` multiply-adds.
The copies in and out are ``O(M * K)``, small next to the ``O(M * K * N)`` matmul.

The VJP is written by hand: autodiff of a loop that reads ``rhs[e]`` would add a full ``[E, K, N]``
cotangent into the carry on every step; here the weight gradient adds one ``[K, N]`` block per step, and
every copy (forward and backward) is a gather through the same layout, never a scatter.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.dispatch.gmm_args import check_gmm_args


class PaddedLayout(NamedTuple):
    """Where rows go in the padded buffer of ``P = E * cb + B * tb`` rows (bulk slabs, then overflow blocks).

    src: int32[P], the source row of each padded row (``M`` for a gap row); dst: int32[M], the padded row of
    each source row (rows past all groups point at ``P``, a zero row); block_group: int32[B], the group of
    each overflow block; num_blocks: int32[], how many overflow blocks hold rows (a prefix of the B).
    """

    src: jax.Array
    dst: jax.Array
    block_group: jax.Array
    num_blocks: jax.Array


def num_blocks(m: int, e: int, tb: int, cb: int = 0) -> int:
    """Static bound on the overflow blocks: ``sum_e ceil(max(g_e - cb, 0) / tb) <= ceil((M - cb) / tb) + E - 1``."""
    rest = max(m - cb, 0)
    return max(-(-rest // tb) + e - 1, 1)


def layout(group_sizes: jax.Array, m: int, tb: int, cb: int = 0) -> PaddedLayout:
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    over = jnp.maximum(sizes - cb, 0)
    blocks = (over + tb - 1) // tb
    block_ends = jnp.cumsum(blocks)
    bulk_rows = e * cb
    over_starts = bulk_rows + (block_ends - blocks) * tb
    nb = num_blocks(m, e, tb, cb)
    total = bulk_rows + nb * tb
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1).astype(jnp.int32)
    offset = rows - starts[row_group]
    dst = jnp.where(offset < cb, row_group * cb + offset, over_starts[row_group] + offset - cb)
    dst = jnp.where(rows < ends[-1], dst, total)       # rows past all groups read the appended zero row
    block_group = jnp.minimum(jnp.searchsorted(block_ends, jnp.arange(nb, dtype=jnp.int32), side="right"),
                              e - 1).astype(jnp.int32)
    # Bulk slab rows.
    p = jnp.arange(bulk_rows, dtype=jnp.int32)
    pg, po = p // max(cb, 1), p % max(cb, 1)
    src_bulk = jnp.where(po < sizes[pg], starts[pg] + po, m)
    # Overflow block rows.
    q = jnp.arange(nb * tb, dtype=jnp.int32)
    qg = block_group[q // tb]
    qo = q - (over_starts[qg] - bulk_rows)
    src_over = jnp.where((q // tb < block_ends[-1]) & (qo < over[qg]), starts[qg] + cb + qo, m)
    return PaddedLayout(jnp.concatenate([src_bulk, src_over]).astype(jnp.int32), dst.astype(jnp.int32),
                        block_group, block_ends[-1])


def _times(xb: jax.Array, xo: jax.Array, w: jax.Array, lay: PaddedLayout, tb: int, transpose: bool) -> jax.Array:
    """Padded rows times their group's weight -> float32[P, N'].

    xb: [E, cb, K'] bulk slabs; xo: [B * tb, K'] overflow blocks; w: [E, K, N]; ``transpose``: multiply by
    ``w[e]^T`` (K' = N, N' = K) instead of ``w[e]`` (K' = K, N' = N).
    """
    e, cb = xb.shape[0], xb.shape[1]
    c = 2 if transpose else 1                           # the axis of w contracted with the rows' columns
    n = w.shape[3 - c]

    def body(i, out):
        x = jax.lax.dynamic_slice_in_dim(xo, i * tb, tb)
        y = jax.lax.dot_general(x, w[lay.block_group[i]], (((1,), (c - 1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, y, i * tb, axis=0)

    y_over = jax.lax.fori_loop(0, lay.num_blocks, body, vary_like(jnp.zeros((xo.shape[0], n), jnp.float32), xo, w))
    if cb == 0:
        return y_over
    y_bulk = jax.lax.dot_general(xb, w, (((2,), (c,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return jnp.concatenate([y_bulk.reshape(e * cb, n), y_over])


def rows_or_zero(a: jax.Array, index: jax.Array) -> jax.Array:
    """``a[index]`` with zero rows for out-of-range indices (the layout's gap rows; every row of an empty ``a``)."""
    if a.shape[0] == 0:
        return jnp.zeros((index.shape[0], *a.shape[1:]), a.dtype)
    return a.at[index].get(mode="fill", fill_value=0)


def _to_padded(x: jax.Array, src: jax.Array, e: int, cb: int) -> tuple[jax.Array, jax.Array]:
    """[M, K] -> bulk slabs [E, cb, K] and overflow blocks [P - E * cb, K] (gap rows, source M, are zero)."""
    return rows_or_zero(x, src[:e * cb]).reshape(e, cb, x.shape[1]), rows_or_zero(x, src[e * cb:])


def _from_padded(xp: jax.Array, dst: jax.Array) -> jax.Array:
    """[P, N] -> [M, N] (rows past all groups, destination P, are zero)."""
    return rows_or_zero(xp, dst)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _padded_gmm(lhs, rhs, group_sizes, tb, cb):
    return _forward(lhs, rhs, group_sizes, tb, cb)[0]


def _forward(lhs, rhs, group_sizes, tb, cb):
    e = rhs.shape[0]
    lay = layout(group_sizes, lhs.shape[0], tb, cb)
    xb, xo = _to_padded(lhs, lay.src, e, cb)
    y = _from_padded(_times(xb, xo, rhs.astype(lhs.dtype), lay, tb, False), lay.dst)
    return y.astype(lhs.dtype), (xb, xo, rhs, lay)


def vary_like(init: jax.Array, *operands: jax.Array) -> jax.Array:
    """``init`` marked as varying over the manual mesh axes any operand varies over (inside ``shard_map``).

    A scan carry must keep its type; under ``shard_map`` the per-device contributions vary over the axes their
    inputs vary over, so a zero initial carry has to be cast to match. Outside ``shard_map`` this is a no-op.
    """
    axes = set().union(*(varying_axes(o) for o in operands)) - varying_axes(init)
    return jax.lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def reduce_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """A hand-written cotangent summed over the manual axes it varies over and its primal does not.

    Under ``shard_map`` a primal that is invariant over an axis (weights replicated over ``data``) was
    implicitly broadcast to the varying computation; the transpose of that broadcast is a ``psum``, which
    autodiff inserts by itself but a custom VJP must do explicitly. Outside ``shard_map`` this is a no-op.
    """
    extra = varying_axes(grad) - varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def varying_axes(x: jax.Array) -> set[str]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``); the attribute moved across versions."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return set(mat.varying)
    return set(getattr(aval, "vma", frozenset()))


def _fwd(lhs, rhs, group_sizes, tb, cb):
    out, res = _forward(lhs, rhs, group_sizes, tb, cb)
    return out, (*res, vary_like(jnp.zeros((), lhs.dtype), lhs))


def _bwd(tb, cb, res, g):
    xb, xo, rhs, lay, lhs_like = res
    e = rhs.shape[0]
    # Gap rows of the padded cotangent are zero, so padding adds nothing to either gradient.
    gb, go = _to_padded(g.astype(xo.dtype), lay.src, e, cb)
    d_lhs = _from_padded(_times(gb, go, rhs.astype(xo.dtype), lay, tb, True).astype(xo.dtype), lay.dst)
    dw_bulk = jax.lax.dot_general(xb, gb, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)

    def body(i, dw):
        x = jax.lax.dynamic_slice_in_dim(xo, i * tb, tb)
        gg = jax.lax.dynamic_slice_in_dim(go, i * tb, tb)
        block = jax.lax.dot_general(x, gg, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        grp = lay.block_group[i]
        return jax.lax.dynamic_update_index_in_dim(dw, dw[grp] + block, grp, 0)

    dw = jax.lax.fori_loop(0, lay.num_blocks, body, vary_like(dw_bulk, xo, go, rhs))
    return reduce_like(d_lhs, lhs_like).astype(xo.dtype), reduce_like(dw, rhs).astype(rhs.dtype), None


_padded_gmm.defvjp(_fwd, _bwd)


def bulk_rows(m: int, e: int) -> int:
    """The ``cb`` of :func:`gmm_bulk`: ``floor(M / E)``, a balanced routing's share of the rows."""
    return m // e


def padded_rows(group_sizes: jax.Array | list[int], tb: int, cb: int = 0) -> int:
    """Rows the matmuls actually process for these group sizes: ``E * cb + sum_e ceil(max(g_e - cb, 0) / tb) * tb``."""
    sizes = [int(g) for g in group_sizes]
    return len(sizes) * cb + sum(-(-max(g - cb, 0) // tb) * tb for g in sizes)


def gmm_padded(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 32, bulk: int = 0) -> jax.Array:
    """Grouped matmul lhs[M, K] @ rhs[E, K, N] over contiguous groups (see module doc); rows past all groups are 0.

    ``tile`` is the block of rows ``tb`` each group's overflow is padded to; ``bulk`` the rows ``cb`` of each
    group that go through the batched matmul (0: none). Accumulates in float32, returns ``lhs.dtype``.
    """
    m, k, e, n = check_gmm_args(lhs, rhs, group_sizes)
    if m == 0:
        return jnp.zeros((0, n), lhs.dtype)
    if bulk < 0:
        raise ValueError(f"gmm: bulk={bulk} must be >= 0")
    tb = max(1, min(int(tile), m))
    return _padded_gmm(lhs, rhs, group_sizes, tb, int(bulk))


def gmm_bulk(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 32) -> jax.Array:
    """:func:`gmm_padded` with ``bulk = floor(M / E)`` rows per group in one batched matmul, the rest in tiles."""
    m, _, e, _ = check_gmm_args(lhs, rhs, group_sizes)
    return gmm_padded(lhs, rhs, group_sizes, tile=tile, bulk=bulk_rows(m, e))
