"""The capacity dispatch/combine operation, one file per backend (see :mod:`moejax.dispatch.backends`).

=================  =================================================  =========================================
backend            what                                               platforms
=================  =================================================  =========================================
``einsum``         one-hot ``[T, E, C]`` tensors (GShard/Switch)      any
``index``          scatter into slots, gather back                    any (the config default)
``pallas_mosaic``  Mosaic row-gather kernels (``pallas`` on TPU/CPU)  TPU; the Pallas interpreter on CPU
``pallas_triton``  Triton row-gather kernels (``pallas`` on GPU)      GPU; the Pallas interpreter on CPU
=================  =================================================  =========================================
"""
from moejax.dispatch.backends.capacity.base import (CAPACITY, CapacityBackend, copy_slots, flat_slot,
                                                    register_capacity_backend, select_capacity)
from moejax.dispatch.backends.capacity import einsum, index, pallas_mosaic, pallas_triton  # noqa: F401 (register)

__all__ = ["CAPACITY", "CapacityBackend", "copy_slots", "flat_slot", "register_capacity_backend", "select_capacity"]
