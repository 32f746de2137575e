"""The whole expert FFN in ``bulk``'s layout: one custom VJP from sorted rows to sorted rows.

``gmm='bulk'`` (:mod:`moejax.dispatch.padded_gmm`) copies rows from expert-sorted order into its layout and
back around *each* matmul, so an MLP expert pays four ``[M, *]`` row copies forward and four backward, two of
them at the hidden width ``F``. Here the layout is entered once and left once:

* the bulk slabs ``[E, cb, D]`` (the first ``cb = M / E`` rows of every group) go through the expert function
  ``vmap``-ed over the experts: batched matmuls, the activation applied to the slabs in place;
* the overflow of over-loaded experts goes through the expert function block by block (``tb`` rows of one
  group), inside a loop whose trip count is the number of non-empty blocks; each block reads its rows from the
  sorted input and writes its outputs to the sorted result directly (no static overflow buffer);
* the backward pass runs the slabs' VJP (residuals saved by the forward pass) and, for each overflow block,
  recomputes the block's forward and adds its parameter gradients into the expert's slot.

Rows past all groups give zero outputs and zero input gradients; an expert with no rows gets exactly zero
parameter gradients (its slab rows are zero inputs with zero cotangents). The expert function must treat rows
independently (any FFN does). Measured against ``bulk`` as a gmm in ``benchmarks/results/``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moejax.dispatch.padded_gmm import bulk_rows, layout, reduce_like, rows_or_zero, vary_like

ExpertFn = Callable[[Any, jax.Array], jax.Array]     # (one expert's params, rows [R, D]) -> [R, D_out]


def _expert(params: Any, g: jax.Array) -> Any:
    return jax.tree.map(lambda p: p[g], params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bulk_ffn(x, params, group_sizes, expert_fn, tb, cb):
    return _forward(x, params, group_sizes, expert_fn, tb, cb)[0]


def _forward(x, params, group_sizes, expert_fn, tb, cb):
    m, e = x.shape[0], group_sizes.shape[0]
    lay = layout(group_sizes, m, tb, cb)
    slabs = rows_or_zero(x, lay.src[:e * cb]).reshape(e, cb, x.shape[1])
    y_slabs, slab_vjp = jax.vjp(jax.vmap(expert_fn), params, slabs)
    y = rows_or_zero(y_slabs.reshape(e * cb, y_slabs.shape[-1]), lay.dst)   # overflow, past-all rows: 0
    over = lay.src[e * cb:]

    def block(i, y):
        idx = jax.lax.dynamic_slice_in_dim(over, i * tb, tb)  # sorted rows of block i; M marks a gap row
        out = expert_fn(_expert(params, lay.block_group[i]), rows_or_zero(x, idx))
        return y.at[idx].set(out.astype(y.dtype), mode="drop")

    y = jax.lax.fori_loop(0, lay.num_blocks, block, y)
    return y, (x, params, lay, slab_vjp)


def _bwd(expert_fn, tb, cb, res, dy):
    x, params, lay, slab_vjp = res
    e = jax.tree.leaves(params)[0].shape[0]
    d_params, d_slabs = slab_vjp(rows_or_zero(dy, lay.src[:e * cb]).reshape(e, cb, dy.shape[1]))
    dx = rows_or_zero(d_slabs.reshape(e * cb, x.shape[1]), lay.dst)
    over = lay.src[e * cb:]

    def block(i, carry):
        d_params, dx = carry
        idx = jax.lax.dynamic_slice_in_dim(over, i * tb, tb)
        g = lay.block_group[i]
        _, block_vjp = jax.vjp(expert_fn, _expert(params, g), rows_or_zero(x, idx))
        d_expert, d_rows = block_vjp(rows_or_zero(dy, idx))
        d_params = jax.tree.map(lambda acc, d: acc.at[g].add(d.astype(acc.dtype)), d_params, d_expert)
        return d_params, dx.at[idx].set(d_rows.astype(dx.dtype), mode="drop")

    init = (jax.tree.map(lambda d, p: vary_like(d, x, dy, p), d_params, params), vary_like(dx, x, dy))
    d_params, dx = jax.lax.fori_loop(0, lay.num_blocks, block, init)
    d_params = jax.tree.map(reduce_like, d_params, params)
    return reduce_like(dx, x), d_params, None


_bulk_ffn.defvjp(_forward, _bwd)


def bulk_ffn(x: jax.Array, params: Any, group_sizes: jax.Array, expert_fn: ExpertFn, *, tile: int = 64,
             bulk: int | None = None) -> jax.Array:
    """``expert_fn`` of expert ``e`` applied to group ``e`` of the sorted rows ``x[M, D]`` -> ``[M, D_out]``.

    params: a pytree of stacked ``[E, ...]`` parameters (``expert_fn`` gets one expert's slice); group_sizes:
    int[E], contiguous groups, rows at or past their sum give zeros. ``tile``: rows of an overflow block;
    ``bulk``: slab rows per expert (default ``M / E``, as ``gmm='bulk'``).
    """
    m, e = x.shape[0], group_sizes.shape[0]
    if x.ndim != 2:
        raise ValueError(f"x: expected sorted rows [M, D], got shape {x.shape}")
    leaves = jax.tree.leaves(params)
    if not leaves or any(p.shape[:1] != (e,) for p in leaves):
        raise ValueError(f"params: every leaf must be stacked over the {e} experts of group_sizes, got "
                         f"{[p.shape for p in leaves]}")
    if m == 0:
        return expert_fn(_expert(params, 0), x)
    cb = bulk_rows(m, e) if bulk is None else int(bulk)
    tb = max(1, min(int(tile), m))
    return _bulk_ffn(x, params, group_sizes.astype(jnp.int32), expert_fn, tb, cb)


__all__ = ["ExpertFn", "bulk_ffn"]
