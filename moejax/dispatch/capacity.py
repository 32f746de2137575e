"""Capacity-limited dispatch: ``[E, C, D]`` buffers, overflow dropped.

Token copies are flattened token-major (copy ``t * K + k``). A *plan* says where every copy goes:

* token choice -> :class:`TokenChoicePlan` (slot ``position`` of each kept copy in its expert);
* expert choice -> the :class:`~moejax.routing.ExpertChoiceRouting` itself (it already names the
  token of every slot).

Two implementations give identical results: ``einsum`` (one-hot dispatch and combine tensors
``[T, E, C]``, the GShard/Switch formulation) and ``index`` (scatter into slots, gather back).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.dispatch.sorting import group_by_expert
from moejax.routing.types import ExpertChoiceRouting, Routing


@struct.dataclass
class TokenChoicePlan:
    """Slots of token-choice copies in capacity-``C`` expert buffers.

    expert_index: int32[T, K]; position: int32[T, K] slot within the expert (meaningful where kept);
    kept: bool[T, K] valid and within capacity; weight: float32[T, K] combine weight, zero unless kept.
    """

    expert_index: jax.Array
    position: jax.Array
    kept: jax.Array
    weight: jax.Array
    capacity: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)


CapacityPlan = TokenChoicePlan | ExpertChoiceRouting


def priority_order(routing: Routing, priority: str) -> jax.Array:
    """int32[T*K]: flat copy indices (``t * K + k``) from highest to lowest priority.

    Both orders put every first choice before any second choice (GShard); within one choice rank,
    ``position`` keeps token order and ``score`` sorts tokens by their largest combine weight,
    descending, ties by token order (batch-prioritised routing, Riquelme et al. 2021).
    """
    t, k = routing.expert_index.shape
    if priority == "position":
        tokens = jnp.arange(t, dtype=jnp.int32)
    elif priority == "score":
        score = jnp.max(jnp.where(routing.valid, routing.weight, -jnp.inf), axis=-1)
        tokens = jnp.argsort(-jax.lax.stop_gradient(score), stable=True).astype(jnp.int32)
    else:
        raise ValueError(f"dispatch.priority={priority!r}: must be 'position' or 'score'")
    return (tokens[None, :] * k + jnp.arange(k, dtype=jnp.int32)[:, None]).reshape(-1)


def plan_token_choice(routing: Routing, capacity: int, priority: str = "position") -> TokenChoicePlan:
    """Assigns each valid copy the next free slot of its expert, in priority order; the rest are dropped."""
    t, k = routing.expert_index.shape
    order = priority_order(routing, priority)
    expert = routing.expert_index.reshape(-1)[order]
    valid = routing.valid.reshape(-1)[order]
    _, _, rank = group_by_expert(expert, valid, routing.num_experts)
    position = jnp.zeros((t * k,), jnp.int32).at[order].set(rank, unique_indices=True).reshape(t, k)
    kept = routing.valid & (position < capacity)
    return TokenChoicePlan(expert_index=routing.expert_index, position=position, kept=kept,
                           weight=jnp.where(kept, routing.weight, 0.0), capacity=capacity,
                           num_experts=routing.num_experts)


def make_plan(routing: Routing | ExpertChoiceRouting, capacity: int, priority: str = "position") -> CapacityPlan:
    """The capacity plan of any routing; expert-choice routing already fixed its own capacity."""
    if isinstance(routing, ExpertChoiceRouting):
        return routing
    return plan_token_choice(routing, capacity, priority)


def _flat_slot(plan: TokenChoicePlan) -> jax.Array:
    """int32[T, K]: ``e * C + position`` for kept copies, ``E * C`` (out of range) for the rest."""
    out_of_range = plan.num_experts * plan.capacity
    return jnp.where(plan.kept, plan.expert_index * plan.capacity + plan.position, out_of_range)


def _token_choice_tensor(plan: TokenChoicePlan, per_copy: jax.Array) -> jax.Array:
    """float[T, E, C] = sum_k per_copy[t, k] * onehot(expert)[e] * onehot(position)[c] over kept copies."""
    e_hot = jax.nn.one_hot(plan.expert_index, plan.num_experts, dtype=per_copy.dtype)
    c_hot = jax.nn.one_hot(jnp.where(plan.kept, plan.position, plan.capacity), plan.capacity, dtype=per_copy.dtype)
    return jnp.einsum("tk,tke,tkc->tec", per_copy, e_hot, c_hot)


def _expert_choice_tensor(plan: ExpertChoiceRouting, per_slot: jax.Array) -> jax.Array:
    """float[T, E, C] with ``per_slot[e, c]`` at ``(token_index[e, c], e, c)`` for valid slots."""
    t_hot = jax.nn.one_hot(plan.token_index, plan.num_tokens, dtype=per_slot.dtype)      # [E, C, T]
    return jnp.einsum("ec,ect->tec", jnp.where(plan.valid, per_slot, 0), t_hot)


def dispatch(plan: CapacityPlan, x: jax.Array, impl: str = "index") -> jax.Array:
    """Gathers tokens into expert buffers. x: [T, D] -> [E, C, D]; empty slots are zero."""
    if impl == "einsum":
        if isinstance(plan, TokenChoicePlan):
            mask = _token_choice_tensor(plan, plan.kept.astype(x.dtype))
        else:
            mask = _expert_choice_tensor(plan, jnp.ones(plan.token_index.shape, x.dtype))
        return jnp.einsum("tec,td->ecd", mask, x)
    if impl == "index":
        if isinstance(plan, TokenChoicePlan):
            e, c, d = plan.num_experts, plan.capacity, x.shape[-1]
            copies = jnp.broadcast_to(x[:, None, :], (*plan.kept.shape, d)).reshape(-1, d)
            buf = jnp.zeros((e * c, d), x.dtype).at[_flat_slot(plan).reshape(-1)].set(
                copies, mode="drop", unique_indices=True)
            return buf.reshape(e, c, d)
        return jnp.where(plan.valid[..., None], x[plan.token_index], 0)
    raise ValueError(f"dispatch.capacity_impl={impl!r}: must be 'einsum' or 'index'")


def combine(plan: CapacityPlan, y: jax.Array, impl: str = "index") -> jax.Array:
    """Weighted sum of expert outputs back per token. y: [E, C, D] -> [T, D]; dropped copies add nothing."""
    if impl == "einsum":
        if isinstance(plan, TokenChoicePlan):
            comb = _token_choice_tensor(plan, plan.weight.astype(y.dtype))
        else:
            comb = _expert_choice_tensor(plan, plan.weight.astype(y.dtype))
        return jnp.einsum("tec,ecd->td", comb, y)
    if impl == "index":
        if isinstance(plan, TokenChoicePlan):
            e, c, d = y.shape
            flat = y.reshape(e * c, d)
            gathered = flat.at[_flat_slot(plan)].get(mode="fill", fill_value=0)       # [T, K, D]
            return jnp.einsum("tk,tkd->td", plan.weight.astype(y.dtype), gathered)
        w = jnp.where(plan.valid, plan.weight, 0).astype(y.dtype)
        return jnp.zeros((plan.num_tokens, y.shape[-1]), y.dtype).at[plan.token_index.reshape(-1)].add(
            (w[..., None] * y).reshape(-1, y.shape[-1]))
    raise ValueError(f"dispatch.capacity_impl={impl!r}: must be 'einsum' or 'index'")
