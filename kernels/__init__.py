"""moejax.kernels: Pallas kernels for grouped expert matmul and capacity dispatch/combine (depends on jax only).

Installed from the top-level ``kernels/`` directory as the import path ``moejax.kernels``. One file per operation
and kernel family:

* :mod:`~moejax.kernels.gmm_pallas_mosaic` (TPU grid spec): :func:`gmm` ``(lhs[M, K], rhs[E, K, N],
  group_sizes[E]) -> [M, N]``, with a custom VJP whose weight gradient is :func:`tgmm` ``(lhs[M, K], grad[M, N],
  group_sizes[E]) -> [E, K, N]``; the forward kernels without VJP are ``gmm_mosaic`` / ``tgmm_mosaic`` (formerly
  ``gmm_pallas`` / ``tgmm_pallas``, still exported).
* :mod:`~moejax.kernels.gmm_pallas_triton` (GPU): :func:`gmm_gpu` (custom VJP) over :func:`gmm_triton` /
  :func:`tgmm_triton`, the same grouped matmuls as Triton kernels (interpret-mode tested, lowered for CUDA, never
  run on a GPU).
* :mod:`~moejax.kernels.capacity_pallas_mosaic`: :func:`capacity_dispatch` ``(x[T, D], slot_of_copy[T, K], S) ->
  [S, D]`` and :func:`capacity_combine` ``(y[S, D], slot_of_copy[T, K], weight[T, K]) -> [T, D]``, with custom VJPs
  (x, y and weight get gradients), built on the row-gather kernels :func:`gather_rows` ``(x[T, D], src[R],
  scale[R]) -> [R, D]`` and :func:`gather_sum` ``(y[R, D], idx[T, K], w[T, K]) -> [T, D]``.
* :mod:`~moejax.kernels.capacity_pallas_triton`: the same as Triton kernels (``*_triton``).
* :mod:`~moejax.kernels.reference`: pure-jnp versions with the same signatures.

Run with ``interpret=True`` on CPU. The dispatch layer selects them as backends (``dispatch.gmm`` /
``dispatch.capacity_impl`` ``pallas``, ``pallas_mosaic``, ``pallas_triton``; :mod:`moejax.dispatch.backends`).
"""
from .capacity_pallas_mosaic import (DEFAULT_ROW_TILING, capacity_combine, capacity_dispatch, gather_rows, gather_sum,
                                     slot_tokens, slot_values, varying_axes)
from .gmm_pallas_mosaic import DEFAULT_TILING, gmm, gmm_mosaic, gmm_pallas, tgmm, tgmm_mosaic, work_items
from .capacity_pallas_triton import (DEFAULT_TRITON_TILING, capacity_combine_triton, capacity_dispatch_triton,
                                     gather_rows_triton, gather_sum_triton)
from .gmm_pallas_triton import DEFAULT_GPU_TILING, gmm_gpu, gmm_triton, tgmm_triton

__all__ = ["DEFAULT_ROW_TILING", "DEFAULT_TILING", "capacity_combine", "capacity_dispatch", "gather_rows",
           "gather_sum", "gmm", "gmm_mosaic", "gmm_pallas", "slot_tokens", "slot_values", "tgmm", "tgmm_mosaic",
           "varying_axes", "work_items"]
__all__ += ["DEFAULT_GPU_TILING", "gmm_gpu", "gmm_triton", "tgmm_triton"]
__all__ += ["DEFAULT_TRITON_TILING", "capacity_combine_triton", "capacity_dispatch_triton", "gather_rows_triton",
            "gather_sum_triton"]
