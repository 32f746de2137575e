"""Grouped matmul over tile-aligned padded groups: the XLA formulation for CPU.

The rows of each group are copied to a buffer in which every group starts on a multiple of the tile ``tb``
(the gap is zero rows), so every ``[tb, K]`` block belongs to exactly one group and needs no mask. A
``lax.scan`` over the blocks multiplies each by its group's weight, indexed in place (no ``[blocks, K, N]``
weight gather). The copies in and out are ``O(M * K)``, small next to the ``O(M * K * N)`` matmul.

The VJP is written by hand: autodiff of a scan that reads ``rhs[e]`` would add a full ``[E, K, N]``
cotangent into the carry on every step; here the weight gradient adds one ``[K, N]`` block per step.

Work: at most ``ceil(M / tb) + E - 1`` blocks of ``tb`` rows, i.e. ``(M + E * tb) * K * N`` multiply-adds
(choose ``tb`` small next to ``M / E``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.dispatch.gmm_args import check_gmm_args


class PaddedLayout(NamedTuple):
    """Where rows go in the padded buffer of ``B * tb`` rows.

    src: int32[B * tb], the source row of each padded row (``M`` for a gap row); dst: int32[M], the padded
    row of each source row (rows past all groups point at a gap row); block_group: int32[B].
    """

    src: jax.Array
    dst: jax.Array
    block_group: jax.Array


def num_blocks(m: int, e: int, tb: int) -> int:
    """Static bound on the padded blocks: ``sum_e ceil(g_e / tb) <= ceil(M / tb) + E - 1``."""
    return -(-m // tb) + e - 1


def layout(group_sizes: jax.Array, m: int, tb: int) -> PaddedLayout:
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    blocks = (sizes + tb - 1) // tb
    block_ends = jnp.cumsum(blocks)
    pad_starts = (block_ends - blocks) * tb
    nb = num_blocks(m, e, tb)
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)
    in_group = rows < ends[-1]
    # Rows past all groups point one past the buffer, where _from_blocks finds a zero row.
    dst = jnp.where(in_group, pad_starts[row_group] + rows - starts[row_group], nb * tb)
    block_group = jnp.minimum(jnp.searchsorted(block_ends, jnp.arange(nb, dtype=jnp.int32), side="right"), e - 1)
    p = jnp.arange(nb * tb, dtype=jnp.int32)
    g = block_group[p // tb]
    offset = p - pad_starts[g]
    src = jnp.where((p // tb < block_ends[-1]) & (offset < sizes[g]), starts[g] + offset, m)
    return PaddedLayout(src.astype(jnp.int32), dst.astype(jnp.int32), block_group.astype(jnp.int32))


def _blocks_times(xb: jax.Array, w: jax.Array, block_group: jax.Array, unroll: int) -> jax.Array:
    """xb: [B, tb, K], w: [E, K, N] -> [B, tb, N], block b times ``w[block_group[b]]`` (float32)."""
    def step(_, item):
        x, g = item
        return None, jnp.dot(x, w[g], preferred_element_type=jnp.float32)

    return jax.lax.scan(step, None, (xb, block_group), unroll=unroll)[1]


def _with_zero_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])


def _to_blocks(x: jax.Array, src: jax.Array, tb: int) -> jax.Array:
    """[M, K] -> [B, tb, K] padded blocks (gap rows read the appended zero row)."""
    return _with_zero_row(x)[src].reshape(-1, tb, x.shape[1])


def _from_blocks(xb: jax.Array, dst: jax.Array) -> jax.Array:
    """[B, tb, N] -> [M, N] (rows past all groups read the appended zero row)."""
    return _with_zero_row(xb.reshape(-1, xb.shape[-1]))[dst]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _padded_gmm(lhs, rhs, group_sizes, tb, unroll):
    return _forward(lhs, rhs, group_sizes, tb, unroll)[0]


def _forward(lhs, rhs, group_sizes, tb, unroll):
    m = lhs.shape[0]
    lay = layout(group_sizes, m, tb)
    xb = _to_blocks(lhs, lay.src, tb)
    yb = _blocks_times(xb, rhs.astype(lhs.dtype), lay.block_group, unroll)
    y = _from_blocks(yb, lay.dst)
    return y.astype(lhs.dtype), (xb, rhs, lay)


def vary_like(init: jax.Array, *operands: jax.Array) -> jax.Array:
    """``init`` marked as varying over the manual mesh axes any operand varies over (inside ``shard_map``).

    A scan carry must keep its type; under ``shard_map`` the per-device contributions vary over the axes their
    inputs vary over, so a zero initial carry has to be cast to match. Outside ``shard_map`` this is a no-op.
    """
    axes = set().union(*(_varying(o) for o in operands)) - _varying(init)
    return jax.lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def reduce_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """A hand-written cotangent summed over the manual axes it varies over and its primal does not.

    Under ``shard_map`` a primal that is invariant over an axis (weights replicated over ``data``) was
    implicitly broadcast to the varying computation; the transpose of that broadcast is a ``psum``, which
    autodiff inserts by itself but a custom VJP must do explicitly. Outside ``shard_map`` this is a no-op.
    """
    extra = _varying(grad) - _varying(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _varying(x: jax.Array) -> set[str]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``); the attribute moved across versions."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return set(mat.varying)
    return set(getattr(aval, "vma", frozenset()))


def _fwd(lhs, rhs, group_sizes, tb, unroll):
    out, (xb, rhs, lay) = _forward(lhs, rhs, group_sizes, tb, unroll)
    return out, (xb, rhs, lay, vary_like(jnp.zeros((), lhs.dtype), lhs))


def _bwd(tb, unroll, res, g):
    xb, rhs, lay, lhs_like = res
    e = rhs.shape[0]
    # Gap rows of the padded cotangent are zero, so padding adds nothing to either gradient.
    gb = _to_blocks(g.astype(xb.dtype), lay.src, tb)
    w_t = jnp.swapaxes(rhs, 1, 2).astype(xb.dtype)
    dxb = _blocks_times(gb, w_t, lay.block_group, unroll).astype(xb.dtype)
    d_lhs = _from_blocks(dxb, lay.dst)

    def step(dw, item):
        x, gg, grp = item
        block = jax.lax.dot_general(x, gg, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, dw[grp] + block, grp, 0), None

    dw0 = vary_like(jnp.zeros((e, rhs.shape[1], rhs.shape[2]), jnp.float32), xb, gb, rhs)
    dw, _ = jax.lax.scan(step, dw0, (xb, gb, lay.block_group), unroll=unroll)
    return reduce_like(d_lhs, lhs_like).astype(xb.dtype), reduce_like(dw, rhs).astype(rhs.dtype), None


_padded_gmm.defvjp(_fwd, _bwd)


def gmm_padded(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 32,
               unroll: int = 1) -> jax.Array:
    """Grouped matmul lhs[M, K] @ rhs[E, K, N] over contiguous groups (see module doc); rows past all groups are 0.

    ``tile`` is the block of rows ``tb`` each group is padded to. Accumulates in float32, returns ``lhs.dtype``.
    """
    m, k, e, n = check_gmm_args(lhs, rhs, group_sizes)
    if m == 0:
        return jnp.zeros((0, n), lhs.dtype)
    tb = max(1, min(int(tile), m))
    return _padded_gmm(lhs, rhs, group_sizes, tb, int(unroll))
