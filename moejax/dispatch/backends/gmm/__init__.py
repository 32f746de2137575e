"""The grouped matmul operation, one file per backend (see :mod:`moejax.dispatch.backends`).

================  ==================================================  ===========================================
backend           what                                                platforms
================  ==================================================  ===========================================
``bulk``          XLA slabs + tile-aligned overflow, fused FFN form   any (``auto`` on CPU)
``tokamax``       ``tokamax.ragged_dot`` (optional package; Mosaic    any where tokamax imports (``auto``'s first
                  GPU/TPU, Triton or XLA as tokamax picks)            choice on GPU/TPU; its XLA path on CPU)
``padded``        XLA tile-aligned blocks, hand-written VJP           any
``blocked``       XLA scan over (row tile, group) items               any (``auto`` elsewhere)
``ragged_dot``    ``jax.lax.ragged_dot``                              any (``auto`` on TPU without tokamax;
                                                                      dense on CPU)
``pallas_mosaic`` Pallas Mosaic kernels (``pallas`` on TPU and CPU)   TPU; the Pallas interpreter on CPU
``pallas_triton`` Pallas Triton kernels (``pallas`` on GPU)           GPU (``auto`` on GPU without tokamax); the
                                                                      Pallas interpreter on CPU
``reference``     per-expert loop (E times the work)                  any
================  ==================================================  ===========================================

``auto`` on GPU: ``tokamax`` when it imports, then ``pallas_triton``, then ``blocked``: never ``ragged_dot``, which XLA
lowers to a dense product over all experts on NVIDIA (see :mod:`moejax.dispatch.backends.gmm.base`). On TPU:
``tokamax``, then ``ragged_dot``, then ``blocked``; ``pallas_mosaic`` only by name until measured on a device. The evidence for that order is in
:mod:`moejax.dispatch.backends.gmm.tokamax`; ``benchmarks/accelerator_check.py`` measures it and prints what ``auto``
should pick.
"""
from moejax.dispatch.backends.gmm.base import GMM, GmmBackend, register_gmm_backend, select_gmm
from moejax.dispatch.backends.gmm import (blocked, bulk, padded, pallas_mosaic, pallas_triton,  # noqa: F401 (register)
                                          ragged_dot, reference, tokamax)

__all__ = ["GMM", "GmmBackend", "register_gmm_backend", "select_gmm"]
