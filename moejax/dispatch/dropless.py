"""Dropless dispatch: sort token copies by expert, run experts over contiguous groups, un-sort.

Nothing is dropped: expert ``e`` gets exactly ``group_sizes[e]`` rows. The buffer has a static
``N = T * K`` rows (``E * C`` for expert choice); invalid copies sit after the last group, where the
grouped matmul gives zeros and the combine weight is zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.dispatch.sorting import group_by_expert, inverse_permutation
from moejax.routing.types import ExpertChoiceRouting, Routing


@struct.dataclass
class DroplessPlan:
    """Rows of the expert-sorted buffer.

    row_token: int32[N], the token each row copies; row_weight: float32[N], its combine weight (zero for
    invalid copies); group_sizes: int32[E]; inverse: int32[N], for token choice the sorted row of copy
    ``t * K + k`` (combine by gather), None for expert choice (combine by scatter-add).
    """

    row_token: jax.Array
    row_weight: jax.Array
    group_sizes: jax.Array
    inverse: jax.Array | None
    num_tokens: int = struct.field(pytree_node=False)


def make_plan(routing: Routing | ExpertChoiceRouting) -> DroplessPlan:
    if isinstance(routing, ExpertChoiceRouting):
        e, c = routing.token_index.shape
        expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), c)
        valid = routing.valid.reshape(-1)
        order, group_sizes, _ = group_by_expert(expert, valid, e)
        weight = jnp.where(valid, routing.weight.reshape(-1), 0.0)
        return DroplessPlan(row_token=routing.token_index.reshape(-1)[order], row_weight=weight[order],
                            group_sizes=group_sizes, inverse=None, num_tokens=routing.num_tokens)
    t, k = routing.expert_index.shape
    valid = routing.valid.reshape(-1)
    order, group_sizes, _ = group_by_expert(routing.expert_index.reshape(-1), valid, routing.num_experts)
    weight = jnp.where(valid, routing.weight.reshape(-1), 0.0)
    return DroplessPlan(row_token=order // k, row_weight=weight[order], group_sizes=group_sizes,
                        inverse=inverse_permutation(order), num_tokens=t)


def dispatch(plan: DroplessPlan, x: jax.Array) -> jax.Array:
    """x: [T, D] -> [N, D] rows sorted by expert."""
    return x[plan.row_token]


def combine(plan: DroplessPlan, y: jax.Array) -> jax.Array:
    """y: [N, D] expert outputs of the sorted rows -> [T, D] weighted per token."""
    weighted = plan.row_weight.astype(y.dtype)[:, None] * y
    if plan.inverse is not None:
        t = plan.num_tokens
        return weighted[plan.inverse].reshape(t, -1, y.shape[-1]).sum(1)
    return jnp.zeros((plan.num_tokens, y.shape[-1]), y.dtype).at[plan.row_token].add(weighted)
