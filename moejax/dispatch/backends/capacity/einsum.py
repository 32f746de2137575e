"""``dispatch.capacity_impl=einsum``: one-hot dispatch and combine tensors ``[T, E, C]`` (GShard/Switch), XLA."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.dispatch.backends.capacity.base import CapacityBackend, register_capacity_backend
from moejax.routing.types import ExpertChoiceRouting


def _token_choice_tensor(plan, per_copy: jax.Array) -> jax.Array:
    """float[T, E, C] = sum_k per_copy[t, k] * onehot(expert)[e] * onehot(position)[c] over kept copies."""
    e_hot = jax.nn.one_hot(plan.expert_index, plan.num_experts, dtype=per_copy.dtype)
    c_hot = jax.nn.one_hot(jnp.where(plan.kept, plan.position, plan.capacity), plan.capacity, dtype=per_copy.dtype)
    return jnp.einsum("tk,tke,tkc->tec", per_copy, e_hot, c_hot)


def _expert_choice_tensor(plan: ExpertChoiceRouting, per_slot: jax.Array) -> jax.Array:
    """float[T, E, C] with ``per_slot[e, c]`` at ``(token_index[e, c], e, c)`` for valid slots."""
    t_hot = jax.nn.one_hot(plan.token_index, plan.num_tokens, dtype=per_slot.dtype)      # [E, C, T]
    return jnp.einsum("ec,ect->tec", jnp.where(plan.valid, per_slot, 0), t_hot)


def dispatch(plan, x: jax.Array) -> jax.Array:
    if isinstance(plan, ExpertChoiceRouting):
        mask = _expert_choice_tensor(plan, jnp.ones(plan.token_index.shape, x.dtype))
    else:
        mask = _token_choice_tensor(plan, plan.kept.astype(x.dtype))
    return jnp.einsum("tec,td->ecd", mask, x)


def combine(plan, y: jax.Array) -> jax.Array:
    if isinstance(plan, ExpertChoiceRouting):
        comb = _expert_choice_tensor(plan, plan.weight.astype(y.dtype))
    else:
        comb = _token_choice_tensor(plan, plan.weight.astype(y.dtype))
    return jnp.einsum("tec,ecd->td", comb, y)


BACKEND = register_capacity_backend(CapacityBackend("einsum", dispatch, combine))
