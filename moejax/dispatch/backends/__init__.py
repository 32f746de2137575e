"""Kernel backends, laid out per operation, one file per backend, each declaring the platforms it supports.

* :mod:`~moejax.dispatch.backends.gmm`: the grouped matmul (``dispatch.gmm``): ``bulk``, ``padded``, ``blocked``,
  ``ragged_dot``, ``pallas_mosaic``, ``pallas_triton``, ``reference``; aliases ``auto`` and ``pallas``.
* :mod:`~moejax.dispatch.backends.capacity`: capacity dispatch/combine (``dispatch.capacity_impl``): ``einsum``,
  ``index``, ``pallas_mosaic``, ``pallas_triton``; alias ``pallas``.

One selection function per operation, :func:`select_gmm` and :func:`select_capacity` ``(name, platform=None) ->
backend``: a backend name stands for itself, an alias for an ordered fallback list per platform (``auto``: bulk on
CPU, tokamax (when installed) then ragged_dot on GPU/TPU, blocked elsewhere; ``pallas``: Mosaic on TPU, Triton on GPU, Mosaic in the Pallas
interpreter on CPU). A backend that does not support the platform is a one-line ValueError naming the config field
and the platform. Each selection is logged at INFO once per (field, name, platform) per process. The Pallas
backends import :mod:`moejax.kernels` (which depends on jax only) when called, never at import.

Adding a backend, e.g. an optional kernel library: one module that registers it when its library imports, and that
the user (or an experiment) imports before building the model::

    from moejax.dispatch.backends import GmmBackend, register_gmm_backend

    def gmm_library(lhs, rhs, group_sizes):        # the contract of moejax.dispatch.backends.gmm.base
        return library.ragged_dot(lhs, rhs, group_sizes)

    register_gmm_backend(GmmBackend("library", gmm_library, platforms=("gpu", "tpu"), kernel="library kernel"))
    # then dispatch.gmm='library'; add prefer_for=("gpu",) to make it auto's first choice on GPU once measured

and a subclass of ``tests/gmm_contract.py``'s ``GmmContract`` in its test file. ``register_gmm_backend`` replaces a
backend of the same name; names of aliases (``auto``, ``pallas``) are refused.
"""
from moejax.dispatch.backends.registry import ANY, Backend, Operation, current_platform, forget_logged
from moejax.dispatch.backends.gmm import GMM, GmmBackend, register_gmm_backend, select_gmm
from moejax.dispatch.backends.capacity import CAPACITY, CapacityBackend, register_capacity_backend, select_capacity

__all__ = ["ANY", "Backend", "CAPACITY", "CapacityBackend", "GMM", "GmmBackend", "Operation", "current_platform",
           "forget_logged", "register_capacity_backend", "register_gmm_backend", "select_capacity", "select_gmm"]
