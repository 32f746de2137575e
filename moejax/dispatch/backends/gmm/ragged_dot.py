"""``dispatch.gmm=ragged_dot``: ``jax.lax.ragged_dot``, the GPU/TPU default.

A real grouped kernel on GPU/TPU, but XLA:CPU lowers it to a dense matmul over all experts (E times the work), so
``auto`` does not pick it on CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


BACKEND = register_gmm_backend(GmmBackend("ragged_dot", gmm_ragged_dot))
