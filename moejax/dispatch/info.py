"""What a dispatcher measured: the :class:`DispatchInfo` of one routing decision."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.routing.types import ExpertChoiceRouting, Routing


@struct.dataclass
class DispatchInfo:
    """What dispatch measured.

    dropped_fraction: float32[], dropped valid copies / valid copies (expert choice: fraction of tokens
    no expert took); expert_load: float32[E], processed copies per expert / processed copies;
    experts_per_token: float32[], processed copies / T; capacity: float32[], ``C`` (``T`` if dropless).
    """

    dropped_fraction: jax.Array
    expert_load: jax.Array
    experts_per_token: jax.Array
    capacity: jax.Array


def token_choice_info(routing: Routing, kept: jax.Array, cap: int) -> DispatchInfo:
    e = routing.num_experts
    valid = routing.valid.sum().astype(jnp.float32)
    n_kept = kept.sum().astype(jnp.float32)
    counts = jnp.einsum("tk,tke->e", kept.astype(jnp.float32),
                        jax.nn.one_hot(routing.expert_index, e, dtype=jnp.float32))
    return DispatchInfo(dropped_fraction=1.0 - n_kept / jnp.maximum(valid, 1.0),
                        expert_load=counts / jnp.maximum(n_kept, 1.0),
                        experts_per_token=n_kept / routing.num_tokens,
                        capacity=jnp.asarray(cap, jnp.float32))


def expert_choice_info(routing: ExpertChoiceRouting) -> DispatchInfo:
    t = routing.num_tokens
    counts = routing.valid.sum(-1).astype(jnp.float32)
    per_token = jnp.zeros((t,), jnp.float32).at[routing.token_index.reshape(-1)].add(
        routing.valid.reshape(-1).astype(jnp.float32))
    return DispatchInfo(dropped_fraction=jnp.mean((per_token == 0).astype(jnp.float32)),
                        expert_load=counts / jnp.maximum(counts.sum(), 1.0),
                        experts_per_token=per_token.mean(),
                        capacity=jnp.asarray(routing.capacity, jnp.float32))
