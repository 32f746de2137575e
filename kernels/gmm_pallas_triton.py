"""Grouped matmul (``gmm``) and its transpose (``tgmm``) as Pallas Triton kernels for GPU.

Same semantics as the Mosaic kernels :func:`moejax.kernels.gmm_pallas_mosaic.gmm_mosaic` /
``tgmm_mosaic``: rows of ``lhs[M, K]`` come in
contiguous groups of ``group_sizes[E]`` rows (``s_e`` the exclusive prefix sum); group ``e`` is multiplied by
``rhs[e]``; rows at or past ``sum(group_sizes)`` belong to no group (zeros in the output, ignored by ``tgmm``).
Accumulation is float32 in registers.

The TPU kernels cannot be reused: the Triton lowering refuses scalar prefetch, so the grid cannot follow a
data-dependent work-item table. Here the grid is static and the data-dependent part moves into loops with
dynamic trip counts, reading int32 tables that XLA computes from ``group_sizes`` and that reach the kernel as
ordinary inputs:

* ``gmm``: grid ``(row tiles, N tiles)``. A program owns one ``[tm, tn]`` output tile. It loops over the groups
  that overlap its rows (``first[i] .. first[i] + count[i]``, from the tables), and for each over ``K`` in
  ``tk`` chunks, loading the lhs rows of that group only (masked load, other rows read as zero), so the
  accumulator ends up holding every group's contribution to the tile. It stores once, masked to ``M`` and
  ``N``: no atomics, no revisiting of output tiles, and rows past all groups come out as exact zeros because no
  group covers them. A tile straddling ``g`` groups reads its lhs rows ``g`` times (each group's own rows);
  groups inside the range that are empty skip their ``K`` loop.
* ``tgmm``: grid ``(E, K tiles, N tiles)``. A program owns one ``[tk, tn]`` tile of ``out[e]`` and loops over
  its group's rows in ``tm`` chunks starting at ``s_e`` (chunks need no alignment), masked to the group's end.
  An empty group runs zero iterations and stores the zero accumulator, so its gradient is exactly zero. The
  work of a group is not split across programs: a hot expert makes its programs long while others are idle
  (no measurement says whether that matters at our sizes).

Ragged edges (``M``, ``K``, ``N`` not multiples of the tiles) are handled by masked loads and stores, so no
operand is padded or copied. The interpreter reads out-of-range slices as NaN (uninitialised values), so a
missing mask shows up as NaN in the interpret-mode tests. Triton wants power-of-two blocks and ``dot`` operands
at least 16 wide, so every tile is a power of two ``>= 16`` (checked), clipped to the dimension rounded up to a
power of two.

Under ``shard_map`` (expert parallelism, check_vma) the results carry the operands' varying mesh axes, so the
kernels lower there too; the interpreter cannot run there with check_vma (a clear error, as for the dispatch
kernels of :mod:`moejax.kernels.capacity_pallas_mosaic`).

Dot precision: ``precision=None`` follows ``jax.default_matmul_precision`` at trace time, as XLA's dots do.
Unset (or ``DEFAULT``/``HIGH``), float32 operands go through TF32 tensor cores, the Pallas Triton default;
``HIGHEST`` (``'float32'``) makes them IEEE float32 products (FMA units, no tensor cores: expect it much slower).
bf16 operands use the tensor cores either way, with a float32 accumulator. The interpreter computes in float32.

Status: tested with the Pallas interpreter on CPU against :mod:`moejax.kernels.reference`, and lowered for CUDA
on a CPU machine (``lowering_platforms=("cuda",)`` produces the Triton custom call; the tests also run the MLIR
verifier on the Triton modules). Once, by hand, the modules of the tests' shapes (bf16, TF32 and IEEE float32)
were compiled to sm_90 cubin by the PyPI ``triton`` 3.9.0 compiler, which is not the Triton inside XLA. Never
run on a GPU here: correctness on a GPU and performance are unmeasured. The default tiles and warp/stage counts
are untuned guesses for an H100: a ``[128, 128]`` float32 accumulator over 8 warps (64 registers a thread) and
``tk = 32`` chunks, so that three pipeline stages of float32 operand tiles (``2 * 128 * 32 * 4`` bytes each,
96 KiB; Triton 3.9.0 reported 96 KiB for float32 and 48 KiB for bf16) fit in shared memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .gmm_pallas_mosaic import _out_shape, reduce_like

Tiling = tuple[int, int, int]
# gmm: (rows, contraction chunk, output columns); tgmm: (row chunk = contraction, output K, output N).
DEFAULT_GPU_TILING: Tiling = (128, 32, 128)
DEFAULT_GPU_TGMM_TILING: Tiling = (32, 128, 128)
DEFAULT_NUM_WARPS = 8
DEFAULT_NUM_STAGES = 3
_MIN_TILE = 16          # Triton's dot needs every operand dimension >= 16


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_tiling(tiling, dims: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validated tiles, each clipped to its dimension rounded up to a power of two (and at least 16)."""
    try:
        tiles = tuple(int(t) for t in tiling)
    except (TypeError, ValueError):
        raise ValueError(f"tiling={tiling!r}: must be three ints") from None
    if len(tiles) != 3 or any(not _is_pow2(t) or t < _MIN_TILE for t in tiles):
        raise ValueError(f"tiling={tiling!r}: must be three powers of two >= {_MIN_TILE} (Triton blocks)")
    return tuple(min(t, max(_MIN_TILE, _next_pow2(d))) for t, d in zip(tiles, dims))


def _check_compiler(num_warps: int, num_stages: int) -> None:
    if not isinstance(num_warps, int) or not _is_pow2(num_warps):
        raise ValueError(f"num_warps={num_warps!r}: must be a positive power of two")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r}: must be a positive int")


def _dot_precision(precision) -> jax.lax.Precision:
    """``precision``, or else jax's default matmul precision config, as one ``lax.Precision``."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision or "default"
    try:
        return jax.lax.Precision(precision)
    except (TypeError, ValueError):
        raise ValueError(f"precision={precision!r}: must be a jax.lax.Precision or its name "
                         "(a dot algorithm preset is not supported)") from None


def _check_group_sizes(group_sizes: jax.Array, e: int) -> None:
    if group_sizes.shape != (e,):
        raise ValueError(f"group_sizes: must have shape ({e},) (one size per group), got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes: must be integer, got {group_sizes.dtype}")


def _group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """int32 ``starts[E]``, ``ends[E]`` of the groups, clipped to ``M`` so that no kernel reads past lhs."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def row_tile_groups(group_sizes: jax.Array, m: int, tm: int) -> tuple[jax.Array, jax.Array]:
    """For each of the ``ceil(M / tm)`` row tiles, the first group overlapping it and how many groups follow.

    Returns int32 ``first[T]``, ``count[T]``: the tile's rows meet groups ``first .. first + count - 1``
    (possibly including empty groups between them); ``count`` is 0 for tiles wholly past ``sum(group_sizes)``.
    """
    _, ends = _group_bounds(group_sizes, m)
    total = ends[-1]
    tile_lo = jnp.arange(-(-m // tm), dtype=jnp.int32) * tm
    tile_last_row = jnp.minimum(tile_lo + tm, total) - 1
    first = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)        # first group ending past lo
    last = jnp.searchsorted(ends, tile_last_row, side="right").astype(jnp.int32)
    count = jnp.where(tile_lo < total, last - first + 1, 0).astype(jnp.int32)
    return jnp.minimum(first, group_sizes.shape[0] - 1), count


def _gmm_kernel(first_ref, count_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, m: int, k: int, n: int,
                tm: int, tk: int, tn: int, rhs_transposed: bool, precision: jax.lax.Precision):
    i, j = pl.program_id(0), pl.program_id(1)
    row0 = i * tm
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)
    cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
    col_ok = cols < n
    num_k = pl.cdiv(k, tk)

    def group_body(g, acc):
        start, end = starts_ref[g], ends_ref[g]
        row_ok = (rows >= start) & (rows < end)          # end <= M: also keeps the load inside lhs
        # Empty groups between the tile's first and last group skip the K loop.
        has_rows = jnp.minimum(end, row0 + tm) > jnp.maximum(start, row0)

        def k_body(kk, acc):
            ks = kk * tk + jnp.arange(tk, dtype=jnp.int32)
            k_ok = ks < k
            x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(kk * tk, tk)],
                           mask=row_ok[:, None] & k_ok[None, :], other=0)
            if rhs_transposed:                           # rhs[E, N, K]: contract both operands' last axis
                w = plgpu.load(rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                               mask=col_ok[:, None] & k_ok[None, :], other=0)
                dims = (((1,), (1,)), ((), ()))
            else:                                        # rhs[E, K, N]
                w = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                               mask=k_ok[:, None] & col_ok[None, :], other=0)
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(x, w, dims, precision=(precision, precision),
                                             preferred_element_type=jnp.float32)

        # int32 cases: jax 0.10.2's Triton lowering gives weak-typed literal cases of a select the predicate's
        # type (i1), and an i1 loop bound fails the scf.for verifier.
        return jax.lax.fori_loop(0, jnp.where(has_rows, jnp.int32(num_k), jnp.int32(0)), k_body, acc)

    first = first_ref[i]
    acc = jax.lax.fori_loop(first, first + count_ref[i], group_body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                mask=(rows < m)[:, None] & col_ok[None, :])


def gmm_triton(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_GPU_TILING,
               interpret: bool = False, preferred_element_type: jnp.dtype | None = None,
               num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = DEFAULT_NUM_STAGES,
               rhs_transposed: bool = False, precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """Forward grouped matmul kernel, no VJP: ``lhs[M, K] @ rhs[E, K, N]`` by contiguous row groups -> ``[M, N]``.

    Args:
      lhs: ``[M, K]``, rows sorted by group. rhs: ``[E, K, N]`` (cast to ``lhs.dtype``), or ``[E, N, K]`` with
        ``rhs_transposed=True`` (the backward pass multiplies by ``rhs[e]^T`` without materialising it).
      group_sizes: int ``[E]``, non-negative; groups past ``M`` rows are cut at ``M``.
      tiling: ``(tm, tk, tn)``: output rows, contraction chunk, output columns; powers of two ``>= 16``.
      interpret: run the Pallas interpreter (the only way on CPU).
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is always float32.
      num_warps, num_stages: Triton compiler parameters (ignored by the interpreter).
      precision: dot precision (``lax.Precision`` or its name); None: ``jax.default_matmul_precision``.

    Returns:
      ``[M, N]``; rows at or past ``sum(group_sizes)`` are zero.
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs: must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs: must be [E, K, N], got shape {rhs.shape}")
    m, k = lhs.shape
    if rhs_transposed:
        e, n, k2 = rhs.shape
    else:
        e, k2, n = rhs.shape
    if k2 != k:
        raise ValueError(f"rhs: has K={k2} but lhs[M, K] has K={k}")
    _check_group_sizes(group_sizes, e)
    _check_compiler(num_warps, num_stages)
    tm, tk, tn = _check_tiling(tiling, (m, k, n))
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or n == 0 or k == 0 or e == 0:
        return jnp.zeros((m, n), out_dtype)
    first, count = row_tile_groups(group_sizes, m, tm)
    starts, ends = _group_bounds(group_sizes, m)
    kernel = functools.partial(_gmm_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn, rhs_transposed=rhs_transposed,
                               precision=_dot_precision(precision))
    return pl.pallas_call(
        kernel,
        out_shape=_out_shape((m, n), out_dtype, interpret, lhs, rhs, group_sizes),
        grid=(-(-m // tm), -(-n // tn)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="moejax_gmm_triton",
    )(first, count, starts, ends, lhs, rhs.astype(lhs.dtype))


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, k: int, n: int, tm: int, tk: int, tn: int,
                 precision: jax.lax.Precision):
    g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    ks = a * tk + jnp.arange(tk, dtype=jnp.int32)
    ns = b * tn + jnp.arange(tn, dtype=jnp.int32)
    k_ok, n_ok = ks < k, ns < n

    def body(r, acc):
        row0 = start + r * tm
        row_ok = (row0 + jnp.arange(tm, dtype=jnp.int32)) < end
        x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(a * tk, tk)], mask=row_ok[:, None] & k_ok[None, :],
                       other=0)
        y = plgpu.load(grad_ref.at[pl.ds(row0, tm), pl.ds(b * tn, tn)], mask=row_ok[:, None] & n_ok[None, :],
                       other=0)
        # [tm, tk]^T @ [tm, tn]: contract the row axis of both operands.
        return acc + jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=(precision, precision),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, tm), body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)], acc.astype(out_ref.dtype),
                mask=k_ok[:, None] & n_ok[None, :])


def tgmm_triton(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
                tiling: Tiling = DEFAULT_GPU_TGMM_TILING, interpret: bool = False,
                preferred_element_type: jnp.dtype | None = None, num_warps: int = DEFAULT_NUM_WARPS,
                num_stages: int = DEFAULT_NUM_STAGES, precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """Transposed grouped matmul kernel: ``out[e] = lhs[group e]^T @ grad[group e]``; ``[M, K], [M, N] -> [E, K, N]``.

    ``tiling = (tm, tk, tn)``: row chunk (the contraction), output ``K`` tile, output ``N`` tile; powers of two
    ``>= 16``. ``grad`` is cast to ``lhs.dtype``; the result has ``preferred_element_type`` (default
    ``lhs.dtype``). Groups with no rows come out exactly zero; rows past ``sum(group_sizes)`` are ignored.
    ``num_warps``, ``num_stages`` and ``precision`` as for :func:`gmm_triton`.
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs: must be [M, K], got shape {lhs.shape}")
    if grad.ndim != 2:
        raise ValueError(f"grad: must be [M, N], got shape {grad.shape}")
    m, k = lhs.shape
    m2, n = grad.shape
    if m2 != m:
        raise ValueError(f"grad: has M={m2} but lhs[M, K] has M={m}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes: must be [E], got shape {group_sizes.shape}")
    e = group_sizes.shape[0]
    _check_group_sizes(group_sizes, e)
    _check_compiler(num_warps, num_stages)
    tm, tk, tn = _check_tiling(tiling, (m, k, n))
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or k == 0 or n == 0 or e == 0:
        return jnp.zeros((e, k, n), out_dtype)
    starts, ends = _group_bounds(group_sizes, m)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, tm=tm, tk=tk, tn=tn, precision=_dot_precision(precision)),
        out_shape=_out_shape((e, k, n), out_dtype, interpret, lhs, grad, group_sizes),
        grid=(e, -(-k // tk), -(-n // tn)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="moejax_tgmm_triton",
    )(starts, ends, lhs, grad.astype(lhs.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _gmm(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type, num_warps, num_stages, precision):
    return gmm_triton(lhs, rhs, group_sizes, tiling=tiling, interpret=interpret,
                      preferred_element_type=preferred_element_type, num_warps=num_warps, num_stages=num_stages,
                      precision=precision)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type, num_warps, num_stages, precision):
    out = _gmm(lhs, rhs, group_sizes, tiling, interpret, preferred_element_type, num_warps, num_stages, precision)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, interpret, preferred_element_type, num_warps, num_stages, precision, res, g):
    del preferred_element_type
    lhs, rhs, group_sizes = res
    tm, tk, tn = tiling
    g = g.astype(lhs.dtype)
    # Every backward kernel keeps the forward's register tile (tm x tn) and contraction chunk (tk).
    # d lhs = g @ rhs[group]^T, reading rhs[E, K, N] as [E, N, K]-transposed in the kernel (no transposed copy).
    d_lhs = gmm_triton(g, rhs, group_sizes, tiling=(tm, tk, tn), interpret=interpret,
                       preferred_element_type=lhs.dtype, num_warps=num_warps, num_stages=num_stages,
                       rhs_transposed=True, precision=precision)
    d_rhs = tgmm_triton(lhs, g, group_sizes, tiling=(tk, tm, tn), interpret=interpret,
                        preferred_element_type=rhs.dtype, num_warps=num_warps, num_stages=num_stages,
                        precision=precision)
    return reduce_like(d_lhs, lhs), reduce_like(d_rhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = DEFAULT_GPU_TILING,
            interpret: bool = False, preferred_element_type: jnp.dtype | None = None,
            num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = DEFAULT_NUM_STAGES,
            precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """Grouped matmul with a custom VJP (Triton kernels): ``lhs[M, K] @ rhs[E, K, N]`` by row groups -> ``[M, N]``.

    Arguments as :func:`gmm_triton`. Gradients: ``d lhs = gmm(g, rhs^T)`` (rows past all groups get zeros) and
    ``d rhs = tgmm(lhs, g)`` with tgmm tiling ``(tk, tm, tn)`` (exactly zero for empty groups); ``group_sizes``
    gets no cotangent. The backward kernels use the forward's precision (resolved when this is traced).
    """
    ptype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    try:
        tiling = tuple(int(t) for t in tiling)
    except (TypeError, ValueError):
        raise ValueError(f"tiling={tiling!r}: must be three ints") from None
    # Argument errors surface here, before tracing the custom VJP.
    if lhs.ndim == 2 and rhs.ndim == 3:
        _check_tiling(tiling, (lhs.shape[0], lhs.shape[1], rhs.shape[2]))
    _check_compiler(num_warps, num_stages)
    return _gmm(lhs, rhs, group_sizes, tiling, bool(interpret), ptype, num_warps, num_stages,
                _dot_precision(precision))
