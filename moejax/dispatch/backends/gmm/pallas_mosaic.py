"""``dispatch.gmm=pallas_mosaic`` (``pallas`` on TPU and CPU): the Mosaic kernels of
:mod:`moejax.kernels.gmm_pallas_mosaic`.

:func:`moejax.kernels.gmm` (custom VJP over the ``gmm``/``tgmm`` kernels) with the TPU grid spec; in the Pallas
interpreter on CPU. Lowered for TPU in ``tests/test_kernel_lowering.py``, never compiled by the TPU compiler nor
run on a TPU here.
"""
from __future__ import annotations

import jax

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128,
        interpret: bool = False) -> jax.Array:
    """:func:`moejax.kernels.gmm` with row tile ``tile`` (K and N tiles 128, clipped to the dimensions)."""
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    return kernels.gmm(lhs, rhs, group_sizes, tiling=(tile, 128, 128), interpret=interpret)


BACKEND = register_gmm_backend(GmmBackend("pallas_mosaic", gmm, platforms=("tpu",), interpret=("cpu",),
                                          kernel="Mosaic kernel", takes_tile=True))
