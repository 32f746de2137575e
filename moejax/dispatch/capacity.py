"""Capacity-limited dispatch: ``[E, C, D]`` buffers, overflow dropped.

Token copies are flattened token-major (copy ``t * K + k``). A *plan* says where every copy goes:

* token choice -> :class:`TokenChoicePlan` (slot ``position`` of each kept copy in its expert);
* expert choice -> the :class:`~moejax.routing.ExpertChoiceRouting` itself (it already names the
  token of every slot).

Four implementations give the same results: ``einsum`` (one-hot dispatch and combine tensors
``[T, E, C]``, the GShard/Switch formulation), ``index`` (scatter into slots, gather back), ``pallas``
(the row-gather kernels of :mod:`moejax.kernels` with their custom VJPs, on a table ``slot_of_copy[T, K]``;
expert-choice plans become ``[T, E]`` tables: the Mosaic kernels on TPU, the Triton kernels of
:mod:`moejax.kernels.dispatch_gpu` on GPU, the Mosaic ones in the Pallas interpreter on CPU) and
``pallas_triton`` (the Triton kernels on GPU, in the Pallas interpreter on CPU; refused on TPU). Neither kernel
family has been compiled or run on its accelerator here (see the kernel modules).
"""
from __future__ import annotations

import functools
import logging

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


IMPLS = ("einsum", "index", "pallas", "pallas_triton")
log = logging.getLogger("moejax")
_logged_pallas = False          # one INFO line per process for 'pallas' ...
_logged_pallas_triton = False   # ... and one for 'pallas_triton'


def _pallas_kernels(impl: str, x: jax.Array):
    """(dispatch, combine) kernels of ``impl`` on the default backend, with ``interpret`` bound.

    ``pallas``: Mosaic kernels on TPU, Triton kernels on GPU, the Mosaic kernels interpreted on CPU.
    ``pallas_triton``: Triton kernels on GPU, interpreted on CPU; TPU has no Triton lowering. The interpreter
    cannot run inside the expert-parallel ``shard_map``, so that case is refused while tracing.
    """
    global _logged_pallas, _logged_pallas_triton
    from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu", "tpu") or (impl == "pallas_triton" and backend == "tpu"):
        where = "GPU" if impl == "pallas_triton" else "TPU and GPU"
        raise ValueError(f"dispatch.capacity_impl={impl!r}: its kernels lower only on {where} (interpret mode on "
                         f"CPU); backend {backend!r} has none, use 'index'")
    interpret = backend == "cpu"
    if interpret and kernels.varying_axes(x):
        raise ValueError(f"dispatch.capacity_impl={impl!r}: on CPU the kernels run in the Pallas interpreter, which "
                         "jax 0.10.2 cannot trace inside the expert-parallel shard_map (check_vma); use 'index' "
                         "with mesh.expert > 1 on CPU")
    triton = impl == "pallas_triton" or backend == "gpu"
    if impl == "pallas_triton":
        first, _logged_pallas_triton = not _logged_pallas_triton, True
    else:
        first, _logged_pallas = not _logged_pallas, True
    if first:
        family = "Triton kernels" if triton else "Mosaic kernels"
        log.info("moejax: dispatch.capacity_impl=%s -> %s on backend %s", impl,
                 ("Pallas interpreter (Triton kernels)" if triton else "Pallas interpreter") if interpret else family,
                 backend)
    if triton:
        return (functools.partial(kernels.capacity_dispatch_triton, interpret=interpret),
                functools.partial(kernels.capacity_combine_triton, interpret=interpret))
    return (functools.partial(kernels.capacity_dispatch, interpret=interpret),
            functools.partial(kernels.capacity_combine, interpret=interpret))


def copy_slots(plan: CapacityPlan) -> tuple[jax.Array, jax.Array]:
    """int32[T, K'] slot ``e * C + c`` of every token copy (``E * C`` if none) and its float combine weight [T, K'].

    Token choice: ``K' = K`` (dropped copies out of range, weight zero). Expert choice: ``K' = E``, copy ``(t, e)``
    is token ``t`` in expert ``e`` (an expert holds a token at most once, as top-k over tokens guarantees); the
    weights are scattered from ``plan.weight``, so their gradient flows back to it.
    """
    if isinstance(plan, TokenChoicePlan):
        return _flat_slot(plan), plan.weight
    e, c = plan.token_index.shape
    t = plan.num_tokens
    rows = jnp.where(plan.valid, plan.token_index, t)                     # invalid slots: dropped by the scatter
    cols = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (e, c))
    slots = jnp.arange(e * c, dtype=jnp.int32).reshape(e, c)
    slot = jnp.full((t, e), e * c, jnp.int32).at[rows, cols].set(slots, mode="drop", unique_indices=True)
    weight = jnp.zeros((t, e), plan.weight.dtype).at[rows, cols].set(plan.weight, mode="drop", unique_indices=True)
    return slot, weight


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
    if impl in ("pallas", "pallas_triton"):
        kernel, _ = _pallas_kernels(impl, x)
        slot, _ = copy_slots(plan)
        e, c = plan.num_experts, plan.capacity
        return kernel(x, slot, e * c).reshape(e, c, x.shape[-1])
    raise ValueError(f"dispatch.capacity_impl={impl!r}: must be one of {list(IMPLS)}")


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
    if impl in ("pallas", "pallas_triton"):
        _, kernel = _pallas_kernels(impl, y)
        slot, weight = copy_slots(plan)
        e, c, d = y.shape
        return kernel(y.reshape(e * c, d), slot, weight)
    raise ValueError(f"dispatch.capacity_impl={impl!r}: must be one of {list(IMPLS)}")
