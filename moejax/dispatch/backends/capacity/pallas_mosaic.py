"""``dispatch.capacity_impl=pallas`` on TPU and CPU: the Mosaic row-gather kernels of
:mod:`moejax.kernels.capacity_pallas_mosaic` on the plan's slot table; in the Pallas interpreter on CPU.

Lowered for TPU in ``tests/test_kernel_lowering.py``, never compiled by the TPU compiler nor run on a TPU here.
"""
from __future__ import annotations

from moejax.dispatch.backends.capacity.base import CapacityBackend, register_capacity_backend, slot_table_kernels

dispatch, combine = slot_table_kernels("capacity_dispatch", "capacity_combine")
BACKEND = register_capacity_backend(CapacityBackend("pallas_mosaic", dispatch, combine, platforms=("tpu",),
                                                    interpret=("cpu",), kernel="Mosaic kernels"))
