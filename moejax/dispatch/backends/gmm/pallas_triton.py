"""``dispatch.gmm=pallas_triton`` (``pallas`` on GPU): the Triton kernels of
:mod:`moejax.kernels.gmm_pallas_triton`.

:func:`moejax.kernels.gmm_gpu` (custom VJP over ``gmm_triton``/``tgmm_triton``); in the Pallas interpreter on
CPU, where it is slow. Lowered for CUDA in the tests, never run on a GPU here; ``auto`` does not pick it until a GPU
measurement says it beats ``ragged_dot`` (``benchmarks/gmm.py``).
"""
from __future__ import annotations

import jax

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128,
        interpret: bool = False) -> jax.Array:
    """:func:`moejax.kernels.gmm_gpu` with the row tile ``tile`` rounded up to a power of two of at least 16 (Triton
    blocks); the K chunk and column tile are the kernel's (untuned) defaults."""
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    _, tk, tn = kernels.DEFAULT_GPU_TILING
    tm = max(16, 1 << (int(tile) - 1).bit_length())
    return kernels.gmm_gpu(lhs, rhs, group_sizes, tiling=(tm, tk, tn), interpret=interpret)


BACKEND = register_gmm_backend(GmmBackend("pallas_triton", gmm, platforms=("gpu",), interpret=("cpu",),
                                          kernel="Triton kernel", takes_tile=True))
