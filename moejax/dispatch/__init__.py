"""Dispatch: move tokens to experts and back, given a routing.

``apply`` is the one entry point the layer uses; ``capacity`` and ``dropless`` expose the plans and the
dispatch/combine halves separately (expert-parallel variants put an all-to-all between them).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from moejax.dispatch import capacity, dropless, gmm
from moejax.dispatch import capacity as _capacity  # `capacity` is also apply()'s argument name
from moejax.dispatch.gmm import get_fused_ffn, get_gmm, register_gmm
from moejax.dispatch.sorting import group_by_expert, inverse_permutation
from moejax.experts.ffn import Grouping, Padded, Ragged
from moejax.routing.types import ExpertChoiceRouting, Routing

ExpertFn = Callable[[jax.Array, Grouping], jax.Array]


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


def _expert_choice_info(routing: ExpertChoiceRouting) -> DispatchInfo:
    t = routing.num_tokens
    counts = routing.valid.sum(-1).astype(jnp.float32)
    per_token = jnp.zeros((t,), jnp.float32).at[routing.token_index.reshape(-1)].add(
        routing.valid.reshape(-1).astype(jnp.float32))
    return DispatchInfo(dropped_fraction=jnp.mean((per_token == 0).astype(jnp.float32)),
                        expert_load=counts / jnp.maximum(counts.sum(), 1.0),
                        experts_per_token=per_token.mean(),
                        capacity=jnp.asarray(routing.capacity, jnp.float32))


def apply(
    x: jax.Array,
    routing: Routing | ExpertChoiceRouting,
    expert_fn: ExpertFn,
    *,
    mode: str = "dropless",
    capacity: int | None = None,
    capacity_impl: str = "index",
    priority: str = "position",
    grouped_matmul: gmm.GroupedMatmul | None = None,
    groups: int = 1,
    fused_ffn: Callable[..., jax.Array] | None = None,
) -> tuple[jax.Array, DispatchInfo]:
    """``combine(expert_fn(dispatch(x)))`` for one routing decision.

    Args:
      x: [T, D] tokens.
      routing: token-choice or expert-choice routing of the T tokens.
      expert_fn: ``(tokens grouped by expert, grouping) -> outputs`` (e.g. a bound :class:`~moejax.experts.Experts`).
      mode: ``capacity`` or ``dropless``.
      capacity: ``C`` for token-choice capacity mode (expert choice carries its own).
      capacity_impl: ``einsum``, ``index`` or ``pallas`` (see :mod:`moejax.dispatch.capacity`).
      priority: ``position`` or ``score`` (capacity mode, token choice).
      grouped_matmul: the gmm for dropless (default: ``get_gmm('auto')``, with its ``fused_ffn``).
      fused_ffn: dropless: a whole-FFN form of the same layout (:func:`get_fused_ffn`) that the experts use
        instead of one gmm per matmul; None: the gmm alone (the default when ``grouped_matmul`` is given).
      groups: ``G`` routing groups of ``T/G`` consecutive tokens, each with its own capacity-``C`` buffers
        (capacity mode, token choice; ``capacity`` is then per group). Dropless mode ignores it.

    Returns:
      y: [T, D] and the :class:`DispatchInfo`.
    """
    if mode == "capacity":
        if isinstance(routing, Routing):
            if capacity is None:
                raise ValueError("capacity: token-choice capacity dispatch needs the expert capacity C")
            if capacity < 1:
                raise ValueError(f"capacity={capacity}: must be >= 1")
        if groups > 1:
            if isinstance(routing, ExpertChoiceRouting):
                raise ValueError(f"dispatch.groups={groups}: routing groups apply to token-choice routers only")
            return _grouped_capacity(x, routing, expert_fn, capacity, capacity_impl, priority, groups)
        plan = _capacity.make_plan(routing, capacity, priority)
        y = expert_fn(_capacity.dispatch(plan, x, capacity_impl), Padded())
        out = _capacity.combine(plan, y, capacity_impl)
        if isinstance(routing, ExpertChoiceRouting):
            return out, _expert_choice_info(routing)
        return out, token_choice_info(routing, plan.kept, plan.capacity)
    if mode == "dropless":
        plan = dropless.make_plan(routing)
        if grouped_matmul is None:
            grouped_matmul, fused_ffn = get_gmm("auto"), fused_ffn or get_fused_ffn("auto")
        y = expert_fn(dropless.dispatch(plan, x), Ragged(plan.group_sizes, grouped_matmul, fused_ffn))
        out = dropless.combine(plan, y)
        if isinstance(routing, ExpertChoiceRouting):
            return out, _expert_choice_info(routing)
        return out, token_choice_info(routing, routing.valid, routing.num_tokens)
    raise ValueError(f"dispatch.mode={mode!r}: must be 'capacity' or 'dropless'")

def _grouped_capacity(x: jax.Array, routing: Routing, expert_fn: ExpertFn, capacity: int, impl: str, priority: str,
                      groups: int) -> tuple[jax.Array, DispatchInfo]:
    """Capacity dispatch in ``G`` routing groups: buffers [G, E, C, D], experts see [E, G*C, D]."""
    t, d = x.shape
    plan = _capacity.plan_groups(routing, groups, capacity, priority)
    buf = jax.vmap(lambda p, xg: _capacity.dispatch(p, xg, impl))(plan, x.reshape(groups, t // groups, d))
    e, c = routing.num_experts, capacity
    y = expert_fn(buf.transpose(1, 0, 2, 3).reshape(e, groups * c, d), Padded())
    y = y.reshape(e, groups, c, -1).transpose(1, 0, 2, 3)
    out = jax.vmap(lambda p, yg: _capacity.combine(p, yg, impl))(plan, y).reshape(t, -1)
    return out, token_choice_info(routing, plan.kept.reshape(t, -1), capacity)


__all__ = ["DispatchInfo", "token_choice_info", "ExpertFn", "apply", "capacity", "dropless", "get_fused_ffn", "get_gmm",
           "gmm", "group_by_expert", "inverse_permutation", "register_gmm"]
