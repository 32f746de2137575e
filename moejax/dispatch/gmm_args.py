"""Argument checks shared by every grouped matmul implementation."""
from __future__ import annotations

import jax


def check_gmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> tuple[int, int, int, int]:
    """(M, K, E, N) of ``gmm(lhs[M, K], rhs[E, K, N], group_sizes[E])``; a ValueError naming the bad shape."""
    m, k = lhs.shape
    e, k2, n = rhs.shape
    if k != k2:
        raise ValueError(f"gmm: lhs[M, K] has K={k} but rhs[E, K, N] has K={k2}")
    if group_sizes.shape != (e,):
        raise ValueError(f"gmm: group_sizes must have shape ({e},), got {group_sizes.shape}")
    return m, k, e, n
