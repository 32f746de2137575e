"""Capacity-limited dispatch: ``[E, C, D]`` buffers, overflow dropped.

Token copies are flattened token-major (copy ``t * K + k``). A *plan* says where every copy goes:

* token choice -> :class:`TokenChoicePlan` (slot ``position`` of each kept copy in its expert);
* expert choice -> the :class:`~moejax.routing.ExpertChoiceRouting` itself (it already names the
  token of every slot).

:func:`dispatch` and :func:`combine` run the backend that ``dispatch.capacity_impl`` selects
(:func:`moejax.dispatch.backends.select_capacity`; one file per backend in :mod:`moejax.dispatch.backends.capacity`),
and all give the same results: ``einsum`` (one-hot dispatch and combine tensors ``[T, E, C]``, the GShard/Switch
formulation), ``index`` (scatter into slots, gather back), ``pallas`` (the Pallas row-gather kernels of
:mod:`moejax.kernels` with their custom VJPs, on a table ``slot_of_copy[T, K]``; expert-choice plans become
``[T, E]`` tables: the Mosaic kernels on TPU, the Triton kernels of :mod:`moejax.kernels.capacity_pallas_triton` on
GPU, the Mosaic ones in the Pallas interpreter on CPU) and ``pallas_triton`` (the Triton kernels on GPU, in the
Pallas interpreter on CPU; refused on TPU). Neither kernel family has been compiled or run on its accelerator here
(see the kernel modules).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.dispatch.backends.capacity import copy_slots, select_capacity  # noqa: F401 (copy_slots: compat)
from moejax.dispatch.backends.registry import current_platform
from moejax.dispatch.padded_gmm import varying_axes
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
IMPLS = ("einsum", "index", "pallas", "pallas_triton")     # the names DispatchConfig.capacity_impl accepts


def priority_order(routing: Routing, priority: str) -> jax.Array:
    """int32[T*K]: flat copy indices (``t * K + k``) from highest to lowest priority.

    Both orders put every first choice before any second choice (GShard); within one choice rank,
    ``position`` keeps token order and ``score`` sorts tokens by their largest combine weight,
    descending, ties by token order (batch-prioritised routing, Riquelme et al. 2021).
    """
    return _priority_order(routing.weight, routing.valid, priority)


def _priority_order(weight: jax.Array, valid: jax.Array, priority: str) -> jax.Array:
    t, k = weight.shape
    if priority == "position":
        tokens = jnp.arange(t, dtype=jnp.int32)
    elif priority == "score":
        score = jnp.max(jnp.where(valid, weight, -jnp.inf), axis=-1)
        tokens = jnp.argsort(-jax.lax.stop_gradient(score), stable=True).astype(jnp.int32)
    else:
        raise ValueError(f"dispatch.priority={priority!r}: must be 'position' or 'score'")
    return (tokens[None, :] * k + jnp.arange(k, dtype=jnp.int32)[:, None]).reshape(-1)


def plan_token_choice(routing: Routing, capacity: int, priority: str = "position") -> TokenChoicePlan:
    """Assigns each valid copy the next free slot of its expert, in priority order; the rest are dropped."""
    return plan_from_arrays(routing.expert_index, routing.weight, routing.valid, routing.num_experts, capacity,
                            priority)


def plan_from_arrays(expert_index: jax.Array, weight: jax.Array, valid: jax.Array, num_experts: int,
                     capacity: int, priority: str = "position") -> TokenChoicePlan:
    """:func:`plan_token_choice` of the routing arrays int32[T, K], float32[T, K], bool[T, K]."""
    t, k = expert_index.shape
    order = _priority_order(weight, valid, priority)
    _, _, rank = group_by_expert(expert_index.reshape(-1)[order], valid.reshape(-1)[order], num_experts)
    position = jnp.zeros((t * k,), jnp.int32).at[order].set(rank, unique_indices=True).reshape(t, k)
    kept = valid & (position < capacity)
    return TokenChoicePlan(expert_index=expert_index, position=position, kept=kept,
                           weight=jnp.where(kept, weight, 0.0), capacity=capacity, num_experts=num_experts)


def plan_groups(routing: Routing, groups: int, capacity: int, priority: str = "position") -> TokenChoicePlan:
    """Capacity plans of ``G = groups`` equal, consecutive groups of tokens, each with its own capacity ``C``.

    Returns a plan whose arrays are ``[G, T/G, K]`` (positions are within the group's buffers): the
    GShard/V-MoE notion of routing groups, which is also what each device computes under expert
    parallelism (a device holds whole groups). ``groups=1`` is :func:`plan_token_choice` with a leading axis.
    """
    t, k = routing.expert_index.shape
    if t % groups:
        raise ValueError(f"dispatch.groups={groups}: must divide the number of routed tokens T={t}")

    def split(a: jax.Array) -> jax.Array:
        return a.reshape(groups, t // groups, k)

    return jax.vmap(lambda e, w, v: plan_from_arrays(e, w, v, routing.num_experts, capacity, priority))(
        split(routing.expert_index), split(routing.weight), split(routing.valid))


def make_plan(routing: Routing | ExpertChoiceRouting, capacity: int, priority: str = "position") -> CapacityPlan:
    """The capacity plan of any routing; expert-choice routing already fixed its own capacity."""
    if isinstance(routing, ExpertChoiceRouting):
        return routing
    return plan_token_choice(routing, capacity, priority)


def _kernels(impl: str, x: jax.Array):
    """``(dispatch, combine)`` of ``dispatch.capacity_impl=impl`` on jax's platform (selection logged once).

    The Pallas interpreter (the ``pallas`` kernels on CPU) cannot run inside the expert-parallel ``shard_map``, so
    that case is refused while tracing.
    """
    platform = current_platform()
    backend = select_capacity(impl, platform)
    if backend.interpreted(platform) and varying_axes(x):
        raise ValueError(f"dispatch.capacity_impl={impl!r}: on CPU the kernels run in the Pallas interpreter, which "
                         "jax 0.10.2 cannot trace inside the expert-parallel shard_map (check_vma); use 'index' "
                         "with mesh.expert > 1 on CPU")
    return backend.bind(platform)


def dispatch(plan: CapacityPlan, x: jax.Array, impl: str = "index") -> jax.Array:
    """Gathers tokens into expert buffers. x: [T, D] -> [E, C, D]; empty slots are zero."""
    return _kernels(impl, x)[0](plan, x)


def combine(plan: CapacityPlan, y: jax.Array, impl: str = "index") -> jax.Array:
    """Weighted sum of expert outputs back per token. y: [E, C, D] -> [T, D]; dropped copies add nothing."""
    return _kernels(impl, y)[1](plan, y)
