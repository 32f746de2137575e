"""moejax.kernels: Pallas kernels for grouped expert matmul (depends on jax only).

Installed from the top-level ``kernels/`` directory as the import path ``moejax.kernels``.

* :func:`gmm` ``(lhs[M, K], rhs[E, K, N], group_sizes[E]) -> [M, N]``, with a custom VJP whose weight
  gradient is :func:`tgmm` ``(lhs[M, K], grad[M, N], group_sizes[E]) -> [E, K, N]``.
* :mod:`moejax.kernels.reference`: pure-jnp versions with the same signatures.

Run with ``interpret=True`` on CPU. ``moejax.dispatch.gmm`` registers the kernel as ``dispatch.gmm=pallas``.
"""
from .gmm import DEFAULT_TILING, gmm, gmm_pallas, tgmm, work_items

__all__ = ["DEFAULT_TILING", "gmm", "gmm_pallas", "tgmm", "work_items"]
