"""Capacity dispatch and combine as two Pallas **Triton** (GPU) row-gather kernels, with custom VJPs.

The GPU twin of :mod:`moejax.kernels.capacity_pallas_mosaic`, with the same public semantics (read its docstring):
one int32 table ``slot_of_copy[T, K]`` holds the flat slot ``e * C + c`` of every token copy (anything outside ``[0, S)``
for a dropped copy; in-range entries distinct), and two kernels do both directions and all the VJPs:

* :func:`gather_rows_triton` ``(x[T, D], src[R], scale[R]) -> [R, D]``, ``out[r] = scale[r] * x[src[r]]``;
* :func:`gather_sum_triton` ``(y[R, D], idx[T, K], w[T, K]) -> [T, D]``, ``out[t] = sum_k w[t, k] * y[idx[t, k]]``,
  accumulated in float32.

:func:`capacity_dispatch_triton` and :func:`capacity_combine_triton` wrap them in custom VJPs built exactly as the
Mosaic module builds its own (x, y and weight get gradients; first order only), on that module's plan helpers
(:func:`~moejax.kernels.capacity_pallas_mosaic.slot_tokens`,
:func:`~moejax.kernels.capacity_pallas_mosaic.slot_values` and the private
``_check_plan``, ``_check_2d``, ``_in_range``, ``_out_shape``, imported rather than copied so that the two kernel
families cannot drift apart on what a plan means).

How a row is fetched. Triton has neither scalar prefetch nor DMAs, but it gathers: a load through a tensor of
pointers. Each program owns an output tile of ``tm`` rows x ``td`` columns. Its ``tm`` source indices and scales
arrive as ordinary blocked inputs (the small index tables are padded to a multiple of ``tm`` in XLA, so those
block loads stay in bounds); the rows themselves are read with one masked load ``plgpu.load(x.at[rows[:, None],
cols[None, :]], mask=, other=0)`` from the whole (unblocked) source array: the Triton lowering turns the two
integer index vectors into a ``[tm, td]`` tensor of pointers. Rows with a zero scale or an out-of-range index are
masked off, so they are never read and give exact zeros. The output is also an unblocked array of exactly
``[R, D]`` written with a masked store, so a ragged last row or column tile needs no padded copy of ``x``, ``y`` or
the result (interpret mode cannot use a vector index together with a ``pl.ds`` slice in one load, which is why
the columns are an index vector too). :func:`gather_sum_triton` loops over the ``K`` entries with a
``fori_loop``; as in the Mosaic kernel, each token's live entries are put first (an XLA sort of the small int
table) and the loop stops at the largest live count in the row tile, so an expert-choice table (``K = E``, mostly
empty) costs the copies that exist, not ``E`` iterations per token.

Tiles: ``tiling = (tm, td)``, both powers of two (Triton's tensors must be). A ``D`` below ``td`` is covered by
one tile of the next power of two. Defaults ``(64, 128)``, ``num_warps=4``, ``num_stages=2``: chosen for an
H100 (a ``[64, 128]`` float32 accumulator is 64 registers per thread at 4 warps; 128 bfloat16 columns are 256
contiguous bytes per gathered row) and **untuned**.

Status: tested in Pallas interpret mode on CPU against :mod:`moejax.kernels.reference` (values and gradients),
and lowered for CUDA on CPU (``lowering_platforms=("cuda",)``: the kernel bodies become Triton IR embedded as
``__gpu$xla.gpu.triton`` custom calls, whose modules the tests run through the MLIR verifier). Once, by hand, the
15 modules of a forward+backward at three shapes (bf16 and float32 at T=100, D=200; bf16 at T=16384, K=8,
D=7168) were compiled to sm_90 by the PyPI ``triton`` 3.9.0 compiler (not the Triton inside XLA), all without
error. Never run on a GPU here: correctness on a GPU and performance are unmeasured.
Under ``shard_map`` the result type names the mesh axes it varies along (as in the Mosaic module); interpret
mode is refused there.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Private helpers of the Mosaic module, imported on purpose (one definition of plans and argument checks).
from .capacity_pallas_mosaic import (_check_2d, _check_plan, _in_range, _out_shape, live_entries_first, slot_tokens,
                                     slot_values)
from .gmm_pallas_mosaic import _round_up

TritonTiling = tuple[int, int]
DEFAULT_TRITON_TILING: TritonTiling = (64, 128)
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2


class TritonOptions(NamedTuple):
    """Static kernel options (hashable: the custom VJPs take them as one non-differentiable argument)."""

    tiling: TritonTiling = DEFAULT_TRITON_TILING
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = DEFAULT_NUM_STAGES
    interpret: bool = False


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _options(name: str, tiling, num_warps, num_stages, interpret) -> TritonOptions:
    """Validated options; errors name the function and the argument, before any tracing of the kernel."""
    try:
        tm, td = (int(v) for v in tiling)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: tiling={tiling!r}: must be two ints (tm, td)") from None
    if not (_is_pow2(tm) and _is_pow2(td)):
        raise ValueError(f"{name}: tiling={tiling!r}: tm and td must be positive powers of two (Triton tensors)")
    if not _is_pow2(int(num_warps)):
        raise ValueError(f"{name}: num_warps={num_warps!r}: must be a positive power of two")
    if int(num_stages) < 1:
        raise ValueError(f"{name}: num_stages={num_stages!r}: must be a positive int")
    return TritonOptions((tm, td), int(num_warps), int(num_stages), bool(interpret))


def _col_tile(td: int, d: int) -> int:
    """The column tile: ``td``, or the next power of two of a smaller ``D`` (one tile, few masked lanes)."""
    return min(td, pl.next_power_of_2(d))


def _check_index(a: jax.Array, what: str, name: str) -> None:
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{name}: {what} must be integer, got {a.dtype}")


def _call(kernel, out_shape, grid, in_specs, opts: TritonOptions, name: str):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),         # whole array; the kernel stores with a mask
        compiler_params=plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages),
        interpret=opts.interpret, name=name)


def _columns(td: int) -> jax.Array:
    """int32[td]: the columns of this program's tile. Read ``program_id`` outside loops: the interpreter
    substitutes it only at the top level of the kernel."""
    return pl.program_id(1) * td + jnp.arange(td, dtype=jnp.int32)


def _store_tile(out_ref, val, tm: int, td: int, rows: int, d: int) -> None:
    """Writes this program's ``[tm, td]`` tile of the whole output ``[rows, d]``, masked at the ragged edges."""
    i, j = pl.program_id(0), pl.program_id(1)
    r, c = i * tm + jnp.arange(tm, dtype=jnp.int32), _columns(td)
    plgpu.store(out_ref.at[pl.ds(i * tm, tm), pl.ds(j * td, td)], val.astype(out_ref.dtype),
                mask=(r < rows)[:, None] & (c < d)[None, :])


def _gather_tile(src_ref, rows, live, c, d: int) -> jax.Array:
    """float32[tm, td]: rows ``rows[live]``, columns ``c`` of the whole ``src_ref[:, d]``; masked-off rows and
    columns are zero and are not read."""
    mask = live[:, None] & (c < d)[None, :]
    vals = plgpu.load(src_ref.at[jnp.where(live, rows, 0)[:, None], c[None, :]], mask=mask, other=0)
    return vals.astype(jnp.float32)


# ---------------------------------------------------------------- gather_rows


def _gather_rows_kernel(src_ref, scale_ref, x_ref, out_ref, *, t: int, r: int, d: int, tm: int, td: int):
    src, scale = src_ref[...], scale_ref[...]                       # int32[tm], float32[tm]
    live = (src >= 0) & (src < t) & (scale != 0)
    rows = _gather_tile(x_ref, src, live, _columns(td), d)
    _store_tile(out_ref, jnp.where(live, scale, 0.0)[:, None] * rows, tm, td, r, d)


def gather_rows_triton(x: jax.Array, src: jax.Array, scale: jax.Array, *,
                       tiling: TritonTiling = DEFAULT_TRITON_TILING, num_warps: int = DEFAULT_NUM_WARPS,
                       num_stages: int = DEFAULT_NUM_STAGES, interpret: bool = False) -> jax.Array:
    """``out[r] = scale[r] * x[src[r]]`` as a Triton kernel; x[T, D], src int[R], scale float[R] -> x.dtype[R, D].

    A row whose ``src`` is outside ``[0, T)`` or whose ``scale`` is zero is exactly zero and is not read. The
    product is taken in float32, then cast. Grid: ``(ceil(R / tm), ceil(D / td))``. ``tiling = (tm, td)``,
    powers of two; ``num_warps``, ``num_stages``: Triton's; ``interpret``: run the Pallas interpreter (the only
    way on CPU). No VJP: the differentiable entry points are :func:`capacity_dispatch_triton` and
    :func:`capacity_combine_triton`.
    """
    name = "gather_rows_triton"
    _check_2d(x, "x[T, D]", name)
    if src.ndim != 1 or src.shape != scale.shape:
        raise ValueError(f"{name}: src and scale must be [R], got {src.shape} and {scale.shape}")
    _check_index(src, "src", name)
    opts = _options(name, tiling, num_warps, num_stages, interpret)
    return _gather_rows(x, src, scale, opts)


def _gather_rows(x: jax.Array, src: jax.Array, scale: jax.Array, opts: TritonOptions) -> jax.Array:
    t, d = x.shape
    r = src.shape[0]
    if r == 0 or d == 0 or t == 0:
        return jnp.zeros((r, d), x.dtype)
    tm, td = opts.tiling[0], _col_tile(opts.tiling[1], d)
    rp = _round_up(r, tm)
    # Padded rows get scale 0: masked off in the kernel, never stored (they lie past R).
    src = jnp.pad(src.astype(jnp.int32), (0, rp - r))
    scale = jnp.pad(scale.astype(jnp.float32), (0, rp - r))
    table = pl.BlockSpec((tm,), lambda i, j: (i,))
    return _call(functools.partial(_gather_rows_kernel, t=t, r=r, d=d, tm=tm, td=td),
                 _out_shape((r, d), x.dtype, opts.interpret, src, scale, x), (rp // tm, pl.cdiv(d, td)),
                 [table, table, pl.BlockSpec(memory_space=pl.ANY)], opts, "moejax_gather_rows_triton")(src, scale, x)


# ---------------------------------------------------------------- gather_sum


def _gather_sum_kernel(count_ref, idx_ref, w_ref, y_ref, out_ref, *, r_rows: int, t: int, d: int, tm: int,
                       td: int):
    c = _columns(td)

    def body(kk, acc):
        idx = idx_ref[kk, :]                                        # int32[tm]: entry kk of each token
        w = w_ref[kk, :]                                            # float32[tm]
        live = (idx >= 0) & (idx < r_rows) & (w != 0)
        return acc + jnp.where(live, w, 0.0)[:, None] * _gather_tile(y_ref, idx, live, c, d)

    # Live entries come first in every token's row: stop at the largest live count of this row tile.
    acc = jax.lax.fori_loop(0, count_ref[0], body, jnp.zeros((tm, td), jnp.float32))
    _store_tile(out_ref, acc, tm, td, t, d)


def gather_sum_triton(y: jax.Array, idx: jax.Array, w: jax.Array, *, tiling: TritonTiling = DEFAULT_TRITON_TILING,
                      num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = DEFAULT_NUM_STAGES,
                      interpret: bool = False, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """``out[t] = sum_k w[t, k] * y[idx[t, k]]`` as a Triton kernel; y[R, D], idx int[T, K], w float[T, K] -> [T, D].

    Entries whose ``idx`` is outside ``[0, R)`` or whose ``w`` is zero add nothing and are not read. Accumulates
    in float32; the result has ``preferred_element_type`` (default ``y.dtype``). Grid: ``(ceil(T / tm),
    ceil(D / td))``, each program looping over the live entries of its tokens. Other arguments as in
    :func:`gather_rows_triton`. No VJP (see :func:`capacity_combine_triton`).
    """
    name = "gather_sum_triton"
    _check_2d(y, "y[R, D]", name)
    _check_2d(idx, "idx[T, K]", name)
    if idx.shape != w.shape:
        raise ValueError(f"{name}: idx[T, K] and w[T, K] must have the same shape, got {idx.shape} and {w.shape}")
    _check_index(idx, "idx", name)
    opts = _options(name, tiling, num_warps, num_stages, interpret)
    return _gather_sum(y, idx, w, opts, preferred_element_type)


def _gather_sum(y: jax.Array, idx: jax.Array, w: jax.Array, opts: TritonOptions,
                preferred_element_type=None) -> jax.Array:
    r_rows, d = y.shape
    t, k = idx.shape
    out_dtype = jnp.dtype(preferred_element_type or y.dtype)
    if t == 0 or d == 0 or k == 0 or r_rows == 0:
        return jnp.zeros((t, d), out_dtype)
    tm, td = opts.tiling[0], _col_tile(opts.tiling[1], d)
    tp = _round_up(t, tm)
    idx, _, w, counts = live_entries_first(idx, w, r_rows, tm)
    # Entry-major [K, T_padded] tables: the kernel reads one contiguous [tm] row of them per entry.
    idx_t, w_t = jnp.pad(idx, ((0, tp - t), (0, 0))).T, jnp.pad(w, ((0, tp - t), (0, 0))).T
    table = pl.BlockSpec((k, tm), lambda i, j: (0, i))
    return _call(functools.partial(_gather_sum_kernel, r_rows=r_rows, t=t, d=d, tm=tm, td=td),
                 _out_shape((t, d), out_dtype, opts.interpret, idx_t, w_t, y), (tp // tm, pl.cdiv(d, td)),
                 [pl.BlockSpec((1,), lambda i, j: (i,)), table, table, pl.BlockSpec(memory_space=pl.ANY)], opts,
                 "moejax_gather_sum_triton")(counts, idx_t, w_t, y)


# ---------------------------------------------------------------- the differentiable entry points


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dispatch(x, slot_of_copy, num_slots, opts):
    tokens = slot_tokens(slot_of_copy, num_slots)
    return _gather_rows(x, tokens, (tokens < x.shape[0]).astype(jnp.float32), opts)


def _dispatch_fwd(x, slot_of_copy, num_slots, opts):
    return _dispatch(x, slot_of_copy, num_slots, opts), slot_of_copy


def _dispatch_bwd(num_slots, opts, slot_of_copy, g):
    kept = _in_range(slot_of_copy, num_slots).astype(jnp.float32)
    # Each token collects the cotangents of the slots its kept copies went to.
    return _gather_sum(g, slot_of_copy, kept, opts), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(y, slot_of_copy, weight, opts):
    return _gather_sum(y, slot_of_copy, weight, opts)


def _combine_fwd(y, slot_of_copy, weight, opts):
    return _combine(y, slot_of_copy, weight, opts), (y, slot_of_copy, weight)


def _combine_bwd(opts, res, g):
    y, slot_of_copy, weight = res
    s = y.shape[0]
    t, k = slot_of_copy.shape
    d_y = _gather_rows(g, slot_tokens(slot_of_copy, s), slot_values(slot_of_copy, weight, s), opts).astype(y.dtype)
    copies = _gather_rows(y, slot_of_copy.reshape(-1), _in_range(slot_of_copy, s).reshape(-1).astype(jnp.float32),
                          opts)                                                               # [T*K, D]
    d_w = jnp.einsum("tkd,td->tk", copies.reshape(t, k, -1), g.astype(y.dtype), preferred_element_type=jnp.float32)
    return d_y, None, d_w.astype(weight.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


def capacity_dispatch_triton(x: jax.Array, slot_of_copy: jax.Array, num_slots: int, *,
                             tiling: TritonTiling = DEFAULT_TRITON_TILING, num_warps: int = DEFAULT_NUM_WARPS,
                             num_stages: int = DEFAULT_NUM_STAGES, interpret: bool = False) -> jax.Array:
    """Gathers token copies into expert slots, with a custom VJP: x[T, D], slot_of_copy int[T, K] -> x.dtype[S, D].

    Same contract as :func:`moejax.kernels.capacity_dispatch`: ``buf[slot_of_copy[t, k]] = x[t]`` for in-range
    entries, other slots zero, ``S = num_slots``; ``dx[t] = sum over kept copies of d_buf[slot]``
    (:func:`gather_sum_triton`, float32 accumulation).
    """
    name = "capacity_dispatch_triton"
    _check_2d(x, "x[T, D]", name)
    _check_plan(slot_of_copy, name)
    if slot_of_copy.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: x[T, D] has T={x.shape[0]} but slot_of_copy[T, K] has T={slot_of_copy.shape[0]}")
    if int(num_slots) < 0:
        raise ValueError(f"{name}: num_slots={num_slots!r}: must be >= 0")
    return _dispatch(x, slot_of_copy, int(num_slots), _options(name, tiling, num_warps, num_stages, interpret))


def capacity_combine_triton(y: jax.Array, slot_of_copy: jax.Array, weight: jax.Array, *,
                            tiling: TritonTiling = DEFAULT_TRITON_TILING, num_warps: int = DEFAULT_NUM_WARPS,
                            num_stages: int = DEFAULT_NUM_STAGES, interpret: bool = False) -> jax.Array:
    """Weighted sum of slot outputs per token (custom VJP): y[S, D], slot_of_copy int[T, K], weight[T, K] -> [T, D].

    Same contract as :func:`moejax.kernels.capacity_combine`: ``out[t] = sum_k weight[t, k] * y[slot_of_copy[t,
    k]]`` over in-range entries in float32; gradients for ``y`` and ``weight`` (zero for out-of-range copies).
    """
    name = "capacity_combine_triton"
    _check_2d(y, "y[S, D]", name)
    _check_plan(slot_of_copy, name)
    if weight.shape != slot_of_copy.shape:
        raise ValueError(f"{name}: weight must have the shape of slot_of_copy {slot_of_copy.shape}, "
                         f"got {weight.shape}")
    return _combine(y, slot_of_copy, weight, _options(name, tiling, num_warps, num_stages, interpret))
