"""Grouped matmul implementations behind one signature, selectable by name.

``gmm(lhs[M, K], rhs[E, K, N], group_sizes[E]) -> out[M, N]``: rows ``[s_e, s_e + group_sizes[e])`` of
``lhs`` (``s_e`` the exclusive prefix sum) are multiplied by ``rhs[e]``. Rows at or past
``sum(group_sizes)`` belong to no group and come out as zeros. Accumulation is in float32; the result has
``lhs``'s dtype.

Registered here: ``padded`` (pure XLA, groups copied into tile-aligned blocks, a loop over the non-empty
blocks with a hand-written VJP, see :mod:`moejax.dispatch.padded_gmm`), ``bulk`` (the same with the first
``M / E`` rows of every group in one batched matmul and only the overflow in blocks: the CPU default, see
``benchmarks/results/``; the MoE layer runs its whole expert FFN in this layout, :mod:`moejax.dispatch.bulk_ffn`),
``blocked`` (pure XLA, tiles of rows; work ``(M + E * tile) * K * N``),
``pallas`` (the Pallas kernels of ``moejax.kernels``: the Triton one on GPU, the Mosaic one elsewhere;
interpret mode on CPU, lowered for TPU in the tests but never run on one), ``pallas_triton`` (the Pallas Triton kernel
:func:`moejax.kernels.gmm_gpu`; interpret mode on CPU, lowered for CUDA but never run on a GPU here),
``ragged_dot`` (``jax.lax.ragged_dot``: a real grouped kernel on GPU/TPU, but a dense matmul over all
experts on XLA:CPU) and ``reference`` (the per-expert loop of :mod:`moejax.reference`, E-times work, for
tests). The kernels package registers its Pallas kernels under further names. ``auto`` resolves per
backend and logs its choice; on GPU it stays ``ragged_dot``, since no GPU measurement says whether the
Triton kernel is faster.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.dispatch import bulk_ffn, padded_gmm
from moejax.dispatch.gmm_args import check_gmm_args

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
log = logging.getLogger("moejax")

_REGISTRY: dict[str, Callable[..., jax.Array]] = {}
_FUSED: dict[str, Callable[..., jax.Array]] = {}
_TILED = set()
_AUTO = {"cpu": "bulk", "gpu": "ragged_dot", "tpu": "ragged_dot"}


def register_gmm(name: str, fn: Callable[..., jax.Array], *, takes_tile: bool = False,
                 fused_ffn: Callable[..., jax.Array] | None = None) -> None:
    """Makes ``fn`` selectable as ``dispatch.gmm=name``; ``takes_tile`` passes ``tile=`` from config (to both).

    ``fused_ffn`` ``(x, stacked params, group_sizes, expert_fn) -> y``: the same layout running a whole expert
    FFN at once, which the MoE layer's experts then use (see :func:`get_fused_ffn`).
    """
    _REGISTRY[name] = fn
    if takes_tile:
        _TILED.add(name)
    if fused_ffn is not None:
        _FUSED[name] = fused_ffn


def available() -> list[str]:
    return sorted(_REGISTRY) + ["auto"]


def resolve_name(name: str, backend: str | None = None) -> str:
    """The registered implementation that ``name`` stands for on ``backend`` (default: jax's backend)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return _AUTO.get(backend, "blocked")
    if name not in _REGISTRY:
        raise ValueError(f"dispatch.gmm={name!r}: unknown grouped matmul; registered: {available()}")
    return name


def get_gmm(name: str = "auto", *, tile: int = 128) -> GroupedMatmul:
    """The grouped matmul for ``name``; logs which implementation ``auto`` chose."""
    resolved = resolve_name(name)
    if name == "auto":
        log.info("moejax: dispatch.gmm=auto -> %s on backend %s", resolved, jax.default_backend())
    if resolved in ("pallas", "pallas_triton"):
        log.info("moejax: dispatch.gmm=%s -> %s", resolved, _pallas_kernel(resolved, jax.default_backend()))
    fn = _REGISTRY[resolved]
    return functools.partial(fn, tile=tile) if resolved in _TILED else fn


def get_fused_ffn(name: str = "auto", *, tile: int = 128) -> Callable[..., jax.Array] | None:
    """The whole-FFN form of ``dispatch.gmm=name`` (None if it has none), e.g. ``bulk``'s :func:`bulk_ffn`."""
    resolved = resolve_name(name)
    fn = _FUSED.get(resolved)
    if fn is None:
        return None
    return functools.partial(fn, tile=tile) if resolved in _TILED else fn


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _work_items(group_sizes: jax.Array, num_tiles: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    """Grouped matmul as a scan over (row tile, group) work items; exact, no E-times work.

    Each of the at most ``ceil(M / tile) + E - 1`` items multiplies one ``[tile, K]`` row block, masked to
    the rows of its group, by that group's ``[K, N]`` weight. Gradients come from autodiff of the scan.
    """
    m, k, e, n = check_gmm_args(lhs, rhs, group_sizes)
    if m == 0:
        return jnp.zeros((0, n), lhs.dtype)
    tm = min(tile, m)
    num_tiles = -(-m // tm)
    padded = jnp.pad(lhs, ((0, num_tiles * tm - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tile_of, group_of, active = _work_items(group_sizes, num_tiles, tm)
    rows_in_tile = jnp.arange(tm, dtype=jnp.int32)

    def step(out, item):
        t, g, on = item
        rows = t * tm + rows_in_tile
        mask = (rows >= starts[g]) & (rows < ends[g]) & on
        x = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(padded, t * tm, tm), 0)
        y = jnp.dot(x, rhs[g].astype(lhs.dtype), preferred_element_type=jnp.float32)
        block = jax.lax.dynamic_slice_in_dim(out, t * tm, tm)
        return jax.lax.dynamic_update_slice_in_dim(out, block + y, t * tm, axis=0), None

    init = padded_gmm.vary_like(jnp.zeros((num_tiles * tm, n), jnp.float32), lhs, rhs)
    out, _ = jax.lax.scan(step, init, (tile_of, group_of, active))
    return out[:m].astype(lhs.dtype)


def _gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from moejax import reference  # local import: reference imports the experts, not dispatch
    return reference.gmm(lhs, rhs, group_sizes)


def _pallas_kernel(name: str, backend: str) -> str:
    """Which kernel ``dispatch.gmm=name`` runs on ``backend``, in words (for the log)."""
    kernel = "Triton" if name == "pallas_triton" or backend == "gpu" else "Mosaic (TPU grid spec)"
    return f"{kernel} kernel" + (" in the Pallas interpreter" if backend == "cpu" else "") + f" on backend {backend}"


def gmm_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128) -> jax.Array:
    """The Pallas kernel of :mod:`moejax.kernels` for the backend (row tile ``tile``); interpret mode on CPU.

    On GPU this is :func:`gmm_pallas_triton`; elsewhere the kernel with the TPU (Mosaic) grid spec, which lowers
    for TPU (``tests/test_kernel_lowering.py``) but has never run on one here. ``auto`` does not pick either on any
    backend yet.
    """
    if jax.default_backend() == "gpu":
        return gmm_pallas_triton(lhs, rhs, group_sizes, tile=tile)
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    interpret = jax.default_backend() == "cpu"
    return kernels.gmm(lhs, rhs, group_sizes, tiling=(tile, 128, 128), interpret=interpret)


def gmm_pallas_triton(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128) -> jax.Array:
    """The Pallas Triton kernel :func:`moejax.kernels.gmm_gpu`; interpret mode on CPU, where it is slow.

    Triton blocks are powers of two of at least 16 rows, so the row tile is ``tile`` rounded up to one; the
    K chunk and column tile are the kernel's (untuned) defaults. Lowered for CUDA in the tests, never run on
    a GPU here.
    """
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    _, tk, tn = kernels.DEFAULT_GPU_TILING
    tm = max(16, 1 << (int(tile) - 1).bit_length())
    interpret = jax.default_backend() == "cpu"
    return kernels.gmm_gpu(lhs, rhs, group_sizes, tiling=(tm, tk, tn), interpret=interpret)


register_gmm("blocked", gmm_blocked, takes_tile=True)
register_gmm("padded", padded_gmm.gmm_padded, takes_tile=True)
register_gmm("bulk", padded_gmm.gmm_bulk, takes_tile=True, fused_ffn=bulk_ffn.bulk_ffn)
register_gmm("pallas", gmm_pallas, takes_tile=True)
register_gmm("pallas_triton", gmm_pallas_triton, takes_tile=True)
register_gmm("ragged_dot", gmm_ragged_dot)
register_gmm("reference", _gmm_reference)
