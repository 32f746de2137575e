"""``dispatch.capacity_impl=pallas`` on TPU and CPU: the Mosaic row-gather kernels of
:mod:`moejax.kernels.capacity_pallas_mosaic` on the plan's slot table; in the Pallas interpreter on CPU.

Lowered for TPU in ``tests/test_kernel_lowering.py``, never compiled by the TPU compiler nor run on a TPU here.
"""
from __future__ import annotations

import jax

from moejax.dispatch.backends.capacity.base import CapacityBackend, copy_slots, register_capacity_backend


def dispatch(plan, x: jax.Array, *, interpret: bool = False) -> jax.Array:
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    slot, _ = copy_slots(plan)
    e, c = plan.num_experts, plan.capacity
    return kernels.capacity_dispatch(x, slot, e * c, interpret=interpret).reshape(e, c, x.shape[-1])


def combine(plan, y: jax.Array, *, interpret: bool = False) -> jax.Array:
    from moejax import kernels
    slot, weight = copy_slots(plan)
    e, c, d = y.shape
    return kernels.capacity_combine(y.reshape(e * c, d), slot, weight, interpret=interpret)


BACKEND = register_capacity_backend(CapacityBackend("pallas_mosaic", dispatch, combine, platforms=("tpu",),
                                                    interpret=("cpu",), kernel="Mosaic kernels"))
