"""``dispatch.capacity_impl=index``: scatter copies into their slots, gather them back (XLA; the default)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.dispatch.backends.capacity.base import CapacityBackend, flat_slot, register_capacity_backend
from moejax.routing.types import ExpertChoiceRouting


def dispatch(plan, x: jax.Array) -> jax.Array:
    if isinstance(plan, ExpertChoiceRouting):
        return jnp.where(plan.valid[..., None], x[plan.token_index], 0)
    e, c, d = plan.num_experts, plan.capacity, x.shape[-1]
    copies = jnp.broadcast_to(x[:, None, :], (*plan.kept.shape, d)).reshape(-1, d)
    buf = jnp.zeros((e * c, d), x.dtype).at[flat_slot(plan).reshape(-1)].set(copies, mode="drop", unique_indices=True)
    return buf.reshape(e, c, d)


def combine(plan, y: jax.Array) -> jax.Array:
    if isinstance(plan, ExpertChoiceRouting):
        w = jnp.where(plan.valid, plan.weight, 0).astype(y.dtype)
        return jnp.zeros((plan.num_tokens, y.shape[-1]), y.dtype).at[plan.token_index.reshape(-1)].add(
            (w[..., None] * y).reshape(-1, y.shape[-1]))
    e, c, d = y.shape
    gathered = y.reshape(e * c, d).at[flat_slot(plan)].get(mode="fill", fill_value=0)       # [T, K, D]
    return jnp.einsum("tk,tkd->td", plan.weight.astype(y.dtype), gathered)


BACKEND = register_capacity_backend(CapacityBackend("index", dispatch, combine))
