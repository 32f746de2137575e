"""``dispatch.gmm=reference``: the per-expert loop of :func:`moejax.reference.gmm` (E times the work; for tests)."""
from __future__ import annotations

import jax

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from moejax import reference  # local import: reference imports the experts, not dispatch
    return reference.gmm(lhs, rhs, group_sizes)


BACKEND = register_gmm_backend(GmmBackend("reference", gmm_reference))
