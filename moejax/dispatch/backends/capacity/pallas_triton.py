"""``dispatch.capacity_impl=pallas_triton`` (``pallas`` on GPU): the Triton row-gather kernels of
:mod:`moejax.kernels.capacity_pallas_triton` on the plan's slot table; in the Pallas interpreter on CPU; TPU has
no Triton lowering, so it is refused there.

Lowered for CUDA in the tests, never run on a GPU here.
"""
from __future__ import annotations

import jax

from moejax.dispatch.backends.capacity.base import CapacityBackend, copy_slots, register_capacity_backend


def dispatch(plan, x: jax.Array, *, interpret: bool = False) -> jax.Array:
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    slot, _ = copy_slots(plan)
    e, c = plan.num_experts, plan.capacity
    return kernels.capacity_dispatch_triton(x, slot, e * c, interpret=interpret).reshape(e, c, x.shape[-1])


def combine(plan, y: jax.Array, *, interpret: bool = False) -> jax.Array:
    from moejax import kernels
    slot, weight = copy_slots(plan)
    e, c, d = y.shape
    return kernels.capacity_combine_triton(y.reshape(e * c, d), slot, weight, interpret=interpret)


BACKEND = register_capacity_backend(CapacityBackend("pallas_triton", dispatch, combine, platforms=("gpu",),
                                                    interpret=("cpu",), kernel="Triton kernels"))
