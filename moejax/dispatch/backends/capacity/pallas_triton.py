"""``dispatch.capacity_impl=pallas_triton`` (``pallas`` on GPU): the Triton row-gather kernels of
:mod:`moejax.kernels.capacity_pallas_triton` on the plan's slot table; in the Pallas interpreter on CPU; TPU has
no Triton lowering, so it is refused there.

Lowered for CUDA in the tests, never run on a GPU here.
"""
from __future__ import annotations

from moejax.dispatch.backends.capacity.base import CapacityBackend, register_capacity_backend, slot_table_kernels

dispatch, combine = slot_table_kernels("capacity_dispatch_triton", "capacity_combine_triton")
BACKEND = register_capacity_backend(CapacityBackend("pallas_triton", dispatch, combine, platforms=("gpu",),
                                                    interpret=("cpu",), kernel="Triton kernels"))
