"""Capacity dispatch and combine as two Pallas row-gather kernels, with custom VJPs.

A capacity plan is one int32 table ``slot_of_copy[T, K]``: the flat slot ``e * C + c`` of each token copy in
the ``S = E * C`` expert slots, or any value outside ``[0, S)`` for a copy that is dropped (invalid, over
capacity, or no copy at all). In-range entries are distinct: a slot holds at most one copy. From it:

* dispatch  ``buf[s] = x[token of slot s]`` (zero for empty slots):  :func:`capacity_dispatch` ``-> [S, D]``;
* combine   ``out[t] = sum_k weight[t, k] * y[slot_of_copy[t, k]]``:  :func:`capacity_combine` ``-> [T, D]``.

Expert-choice plans fit the same table with ``K = E`` (copy ``(t, e)`` is token ``t`` in expert ``e``, out of
range where expert ``e`` did not take ``t``), since an expert takes a token at most once.

Both directions, and all their VJPs, are two kernels:

* :func:`gather_rows` ``(x[T, D], src[R], scale[R]) -> [R, D]``, ``out[r] = scale[r] * x[src[r]]``;
* :func:`gather_sum` ``(y[R, D], idx[T, K], w[T, K]) -> [T, D]``, ``out[t] = sum_k w[t, k] * y[idx[t, k]]``,
  accumulated in float32.

Gradients: ``d dispatch / dx = gather_sum(d_buf, slot_of_copy, kept)``, ``d combine / dy =
gather_rows(d_out, slot_token, slot_weight)`` and ``d combine / d weight[t, k] = <d_out[t], y[slot[t, k]]>``
(the rows gathered with :func:`gather_rows`, the dot in float32). The integer table gets no cotangent. The
VJPs are first-order only (their backward passes are kernels without VJPs of their own).

How a row is fetched. The source array stays in HBM (``memory_space=pl.ANY``); each grid step owns an output
tile of ``tm`` rows x ``td`` columns and copies the ``tm`` source rows it needs into a VMEM buffer with one
``pltpu.make_async_copy`` each, the row index read from a scalar-prefetched (SMEM) table: all ``tm`` copies are
in flight together. Rows with a zero scale or weight (empty slots, dropped copies) are never copied. The scales
and weights themselves arrive as ordinary VMEM blocks (``[tm, 1]``, ``[K, tm, 1]``) for the vector arithmetic. We
chose DMAs over a ``(1, td)`` BlockSpec whose index_map reads the table because Mosaic requires the second-minor
block dimension to be a multiple of 8 (or the whole array), so a one-row block would need a ``[T, 1, D]`` view that
TPU layouts pad eightfold; and over dynamic ``pl.ds`` loads from a VMEM-resident source because that keeps all
``T`` rows in VMEM. :func:`gather_sum` puts each token's live entries first (an XLA sort of the small int table)
and loops only up to the largest live count in the tile, double-buffering the copies of entry ``k + 1`` behind
the accumulation of entry ``k``; with expert-choice tables (``K = E``, mostly empty) it does the work of the
copies that exist, not of ``E`` per token. The row loops are ``fori_loop`` s, not unrolled, so the interpreter's
compile time does not grow with ``tm``.

Status: tested in interpret mode on CPU, also under the TPU interpreter (``pltpu.InterpretParams``: DMAs executed
at their wait, NaN-filled uninitialized memory, race detection), and under ``vmap``. The Mosaic (TPU) lowering
is tested on CPU by lowering for ``tpu`` (``tests/test_kernel_lowering.py``: Mosaic MLIR that passes its verifier),
but never compiled by the TPU compiler nor run on a TPU here: it relies on HBM refs, one-row DMAs at dynamic row
offsets (into one sublane of a VMEM tile) and SMEM scalars. The index tables are scalar-prefetched whole, so
``T * K`` is bounded by the SMEM of the TPU generation; larger plans would need the tables blocked per row tile. Under ``shard_map`` the result type
names the mesh axes it varies along; interpret mode is refused there, since jax 0.10.2's interpreter loses those
axes in its grid loop. Triton (GPU) has no scalar prefetch or DMA: GPU has its own Triton kernels
(:mod:`moejax.kernels.capacity_pallas_triton`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .gmm_pallas_mosaic import _out_shape, _round_up, varying_axes  # noqa: F401 (re-exported)

RowTiling = tuple[int, int]
# 8 rows fill the sublanes of one float32 vreg; (8, 512) keeps gather_sum's float32 accumulator at four vregs.
DEFAULT_ROW_TILING: RowTiling = (8, 512)
LANES = 128


def _tiles(tiling: RowTiling, d: int) -> tuple[int, int, int]:
    """(tm, td, padded D): a D that fits one tile is taken whole, padded to a multiple of 128 lanes, else padded to
    a multiple of td. Mosaic DMAs a row at a dynamic offset only when the row is a multiple of 128 lanes of 32 bits
    (a 64-wide float32 row was refused: "could not determine that the dynamic offset times the element size is a
    multiple of the word size (4096 bits)", found compiling for TPU v5e)."""
    if len(tiling) != 2 or any(int(t) < 1 for t in tiling):
        raise ValueError(f"tiling={tiling}: must be two positive ints (tm, td)")
    tm, td = int(tiling[0]), int(tiling[1])
    if d <= td:
        return tm, _round_up(d, LANES), _round_up(d, LANES)
    return tm, td, _round_up(d, td)


def _check_2d(a: jax.Array, what: str, name: str) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name}: {what} must be 2-D, got shape {a.shape}")


def _for_rows(n: int, body) -> None:
    """``body(r)`` for r < n as a loop, not unrolled: the interpreter's compile time then does not grow with n."""
    def step(r, carry):
        body(r)
        return carry

    jax.lax.fori_loop(0, n, step, 0)


def _dma_rows(x: jax.Array) -> jax.Array:
    """The source the row copies read: ``x`` itself for 32-bit dtypes, a float32 copy of a narrower one.

    Mosaic packs 16-bit rows in pairs of sublanes, and one row copied into such a VMEM tile at a dynamic row offset
    is refused when compiled for TPU ("offsets along tiled dimensions must be aligned to tiles"; found compiling
    for TPU v4, v5e, v5p and v6e with :mod:`moejax.aot`, jax 0.10.2, libtpu 0.0.42.1; the interpreter accepts it).
    The kernels compute in float32 anyway, so results are unchanged; a 16-bit source is read at twice its bytes.
    """
    return x if jnp.dtype(x.dtype).itemsize >= 4 else x.astype(jnp.float32)


# ---------------------------------------------------------------- gather_rows


def _gather_rows_kernel(src_ref, live_ref, scale_ref, x_hbm, out_ref, buf, sem, *, tm: int, td: int):
    i, j = pl.program_id(0), pl.program_id(1)

    def copy(r):
        return pltpu.make_async_copy(x_hbm.at[pl.ds(src_ref[i * tm + r], 1), pl.ds(j * td, td)],
                                     buf.at[pl.ds(r, 1)], sem.at[r])

    _for_rows(tm, lambda r: pl.when(live_ref[i * tm + r] != 0)(lambda: copy(r).start()))
    _for_rows(tm, lambda r: pl.when(live_ref[i * tm + r] != 0)(lambda: copy(r).wait()))
    scale = scale_ref[...]                  # [tm, 1]
    # `where`, not a product: rows that were not copied hold stale buffer contents.
    out_ref[...] = jnp.where(scale != 0, scale * buf[...].astype(jnp.float32), 0.0).astype(out_ref.dtype)


def gather_rows(x: jax.Array, src: jax.Array, scale: jax.Array, *, tiling: RowTiling = DEFAULT_ROW_TILING,
                interpret: bool = False) -> jax.Array:
    """``out[r] = scale[r] * x[src[r]]`` as a Pallas kernel; x[T, D], src int[R], scale float[R] -> x.dtype[R, D].

    A row whose ``src`` is outside ``[0, T)`` or whose ``scale`` is zero is exactly zero (and is not read). The
    product is taken in float32, then cast. ``tiling = (tm, td)``: rows and columns per grid step (D need not
    be a multiple of td). ``interpret``: run the Pallas interpreter (the only way on CPU). No VJP: the
    differentiable entry points are :func:`capacity_dispatch` and :func:`capacity_combine`.
    """
    _check_2d(x, "x[T, D]", "gather_rows")
    if src.shape != scale.shape or src.ndim != 1:
        raise ValueError(f"gather_rows: src and scale must be [R], got {src.shape} and {scale.shape}")
    t, d = x.shape
    r = src.shape[0]
    tm, td, dp = _tiles(tiling, d)
    if r == 0 or d == 0 or t == 0:
        return jnp.zeros((r, d), x.dtype)
    rp = _round_up(r, tm)
    src, scale = src.astype(jnp.int32), scale.astype(jnp.float32)
    live = jnp.pad((src >= 0) & (src < t) & (scale != 0), (0, rp - r))
    src = jnp.pad(src, (0, rp - r))
    src = jnp.where(live, src, 0)
    scale = jnp.where(live, jnp.pad(scale, (0, rp - r)), 0.0)
    x_p = _dma_rows(jnp.pad(x, ((0, 0), (0, dp - d))))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(rp // tm, dp // td),
        in_specs=[pl.BlockSpec((tm, 1), lambda i, j, src, live: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((tm, td), lambda i, j, src, live: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, td), x_p.dtype), pltpu.SemaphoreType.DMA((tm,))],
    )
    out = pl.pallas_call(
        functools.partial(_gather_rows_kernel, tm=tm, td=td),
        out_shape=_out_shape((rp, dp), x.dtype, interpret, src, scale, x_p),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="moejax_gather_rows",
    )(src, live.astype(jnp.int32), scale[:, None], x_p)
    return out[:r, :d]


# ---------------------------------------------------------------- gather_sum


def _gather_sum_kernel(idx_ref, live_ref, count_ref, w_ref, y_hbm, out_ref, buf, sem, *, tm: int, td: int,
                       k: int):
    i, j = pl.program_id(0), pl.program_id(1)

    def entry(r, kk):                       # flat position of (token i * tm + r, entry kk) in the SMEM tables
        return (i * tm + r) * k + kk

    def copy(r, kk, slot):
        return pltpu.make_async_copy(y_hbm.at[pl.ds(idx_ref[entry(r, kk)], 1), pl.ds(j * td, td)],
                                     buf.at[slot, pl.ds(r, 1)], sem.at[slot, r])

    def for_live_rows(kk, slot, action):
        _for_rows(tm, lambda r: pl.when(live_ref[entry(r, kk)] != 0)(lambda: action(copy(r, kk, slot))))

    n = count_ref[i]                        # largest number of live entries of a token in this tile

    @pl.when(n > 0)
    def _():
        for_live_rows(0, 0, lambda c: c.start())

    def body(kk, acc):
        slot = kk % 2

        @pl.when(kk + 1 < n)
        def _():
            for_live_rows(kk + 1, 1 - slot, lambda c: c.start())

        for_live_rows(kk, slot, lambda c: c.wait())
        w = w_ref[kk]                       # [tm, 1]
        # `where`, not a product: rows that were not copied hold stale buffer contents.
        return acc + jnp.where(w != 0, w * buf[slot].astype(jnp.float32), 0.0)

    acc = jax.lax.fori_loop(0, n, body, jnp.zeros((tm, td), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def live_entries_first(idx: jax.Array, w: jax.Array, num_rows: int, tm: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The tables of :func:`gather_sum` with each token's live entries first (an XLA sort of the small table).

    An entry ``(t, k)`` is live when ``0 <= idx < num_rows`` and ``w != 0``. Returns ``idx`` int32[T, K] (dead
    entries 0), ``live`` bool[T, K], ``w`` float32[T, K] (dead entries 0) and ``counts`` int32[ceil(T / tm)], the
    largest live count among the ``tm`` tokens of each tile, so a kernel loops only that far.
    """
    t = idx.shape[0]
    tp = _round_up(t, tm)
    idx, w = idx.astype(jnp.int32), w.astype(jnp.float32)
    live = (idx >= 0) & (idx < num_rows) & (w != 0)
    order = jnp.argsort((~live).astype(jnp.int32), axis=1, stable=True)
    live = jnp.take_along_axis(live, order, axis=1)
    idx = jnp.where(live, jnp.take_along_axis(idx, order, axis=1), 0)
    w = jnp.where(live, jnp.take_along_axis(w, order, axis=1), 0.0)
    counts = jnp.pad(live.sum(axis=1, dtype=jnp.int32), (0, tp - t)).reshape(tp // tm, tm).max(axis=1)
    return idx, live, w, counts


def gather_sum(y: jax.Array, idx: jax.Array, w: jax.Array, *, tiling: RowTiling = DEFAULT_ROW_TILING,
               interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """``out[t] = sum_k w[t, k] * y[idx[t, k]]`` as a Pallas kernel; y[R, D], idx int[T, K], w float[T, K] -> [T, D].

    Entries whose ``idx`` is outside ``[0, R)`` or whose ``w`` is zero add nothing (and are not read).
    Accumulates in float32; the result has ``preferred_element_type`` (default ``y.dtype``). ``tiling``,
    ``interpret``: as in :func:`gather_rows`. No VJP (see :func:`capacity_combine`).
    """
    _check_2d(y, "y[R, D]", "gather_sum")
    _check_2d(idx, "idx[T, K]", "gather_sum")
    if idx.shape != w.shape:
        raise ValueError(f"gather_sum: idx[T, K] and w[T, K] must have the same shape, got {idx.shape} and {w.shape}")
    r_rows, d = y.shape
    t, k = idx.shape
    out_dtype = jnp.dtype(preferred_element_type or y.dtype)
    tm, td, dp = _tiles(tiling, d)
    if t == 0 or d == 0 or k == 0 or r_rows == 0:
        return jnp.zeros((t, d), out_dtype)
    tp = _round_up(t, tm)
    idx, live, w, counts = live_entries_first(idx, w, r_rows, tm)
    pad = ((0, tp - t), (0, 0))
    idx, live, w = jnp.pad(idx, pad).reshape(-1), jnp.pad(live, pad).reshape(-1), jnp.pad(w, pad)
    y_p = _dma_rows(jnp.pad(y, ((0, 0), (0, dp - d))))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(tp // tm, dp // td),
        in_specs=[pl.BlockSpec((k, tm, 1), lambda i, j, idx, live, counts: (0, i, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((tm, td), lambda i, j, idx, live, counts: (i, j)),
        scratch_shapes=[pltpu.VMEM((2, tm, td), y_p.dtype), pltpu.SemaphoreType.DMA((2, tm))],
    )
    out = pl.pallas_call(
        functools.partial(_gather_sum_kernel, tm=tm, td=td, k=k),
        out_shape=_out_shape((tp, dp), out_dtype, interpret, idx, w, y_p),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="moejax_gather_sum",
    )(idx, live.astype(jnp.int32), counts, w.T[:, :, None], y_p)
    return out[:t, :d]


# ---------------------------------------------------------------- plans and the differentiable entry points


def _in_range(slot_of_copy: jax.Array, num_slots: int) -> jax.Array:
    return (slot_of_copy >= 0) & (slot_of_copy < num_slots)


def slot_tokens(slot_of_copy: jax.Array, num_slots: int) -> jax.Array:
    """int32[S]: the token whose copy sits in each slot; ``T`` (out of range) for an empty slot."""
    t, k = slot_of_copy.shape
    where = jnp.where(_in_range(slot_of_copy, num_slots), slot_of_copy, num_slots).reshape(-1)
    tokens = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(-1)
    return jnp.full((num_slots,), t, jnp.int32).at[where].set(tokens, mode="drop", unique_indices=True)


def slot_values(slot_of_copy: jax.Array, values: jax.Array, num_slots: int) -> jax.Array:
    """float32[S]: ``values[t, k]`` moved to the slot of copy ``(t, k)``; zero for an empty slot."""
    where = jnp.where(_in_range(slot_of_copy, num_slots), slot_of_copy, num_slots).reshape(-1)
    return jnp.zeros((num_slots,), jnp.float32).at[where].set(values.astype(jnp.float32).reshape(-1), mode="drop",
                                                              unique_indices=True)


def _check_plan(slot_of_copy: jax.Array, name: str) -> None:
    _check_2d(slot_of_copy, "slot_of_copy[T, K]", name)
    if not jnp.issubdtype(slot_of_copy.dtype, jnp.integer):
        raise ValueError(f"{name}: slot_of_copy must be integer, got {slot_of_copy.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dispatch(x, slot_of_copy, num_slots, tiling, interpret):
    tokens = slot_tokens(slot_of_copy, num_slots)
    return gather_rows(x, tokens, (tokens < x.shape[0]).astype(jnp.float32), tiling=tiling, interpret=interpret)


def _dispatch_fwd(x, slot_of_copy, num_slots, tiling, interpret):
    return _dispatch(x, slot_of_copy, num_slots, tiling, interpret), slot_of_copy


def _dispatch_bwd(num_slots, tiling, interpret, slot_of_copy, g):
    kept = _in_range(slot_of_copy, num_slots).astype(jnp.float32)
    # Each token collects the cotangents of the slots its kept copies went to.
    return gather_sum(g, slot_of_copy, kept, tiling=tiling, interpret=interpret), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(y, slot_of_copy, weight, tiling, interpret):
    return gather_sum(y, slot_of_copy, weight, tiling=tiling, interpret=interpret)


def _combine_fwd(y, slot_of_copy, weight, tiling, interpret):
    return _combine(y, slot_of_copy, weight, tiling, interpret), (y, slot_of_copy, weight)


def _combine_bwd(tiling, interpret, res, g):
    y, slot_of_copy, weight = res
    s = y.shape[0]
    t, k = slot_of_copy.shape
    d_y = gather_rows(g, slot_tokens(slot_of_copy, s), slot_values(slot_of_copy, weight, s), tiling=tiling,
                      interpret=interpret).astype(y.dtype)
    copies = gather_rows(y, slot_of_copy.reshape(-1), _in_range(slot_of_copy, s).reshape(-1).astype(jnp.float32),
                         tiling=tiling, interpret=interpret)                                  # [T*K, D]
    d_w = jnp.einsum("tkd,td->tk", copies.reshape(t, k, -1), g.astype(y.dtype), preferred_element_type=jnp.float32)
    return d_y, None, d_w.astype(weight.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


def capacity_dispatch(x: jax.Array, slot_of_copy: jax.Array, num_slots: int, *,
                      tiling: RowTiling = DEFAULT_ROW_TILING, interpret: bool = False) -> jax.Array:
    """Gathers token copies into expert slots, with a custom VJP: x[T, D], slot_of_copy int[T, K] -> x.dtype[S, D].

    ``buf[slot_of_copy[t, k]] = x[t]`` for in-range entries (distinct), other slots zero; ``S = num_slots``
    (``E * C``; reshape to ``[E, C, D]``). Gradient: ``dx[t] = sum over kept copies of d_buf[slot]``
    (:func:`gather_sum`, float32 accumulation).
    """
    _check_2d(x, "x[T, D]", "capacity_dispatch")
    _check_plan(slot_of_copy, "capacity_dispatch")
    if slot_of_copy.shape[0] != x.shape[0]:
        raise ValueError(f"capacity_dispatch: x[T, D] has T={x.shape[0]} but slot_of_copy[T, K] has "
                         f"T={slot_of_copy.shape[0]}")
    return _dispatch(x, slot_of_copy, int(num_slots), tuple(int(v) for v in tiling), bool(interpret))


def capacity_combine(y: jax.Array, slot_of_copy: jax.Array, weight: jax.Array, *,
                     tiling: RowTiling = DEFAULT_ROW_TILING, interpret: bool = False) -> jax.Array:
    """Weighted sum of slot outputs per token, with a custom VJP: y[S, D], slot_of_copy int[T, K], weight[T, K] -> [T, D].

    ``out[t] = sum_k weight[t, k] * y[slot_of_copy[t, k]]`` over in-range entries, float32 accumulation.
    Gradients for ``y`` (``d_y[slot] = weight of its copy * d_out[token]``) and for ``weight``
    (``<d_out[t], y[slot[t, k]]>`` in float32, zero for out-of-range copies).
    """
    _check_2d(y, "y[S, D]", "capacity_combine")
    _check_plan(slot_of_copy, "capacity_combine")
    if weight.shape != slot_of_copy.shape:
        raise ValueError(f"capacity_combine: weight must have the shape of slot_of_copy {slot_of_copy.shape}, "
                         f"got {weight.shape}")
    return _combine(y, slot_of_copy, weight, tuple(int(v) for v in tiling), bool(interpret))
