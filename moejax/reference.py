"""The oracle: slow, obviously correct per-expert loops.

Every fast path (capacity einsum/index, dropless with each grouped matmul, later the kernels and
expert-parallel dispatch) is tested against these functions, in values and gradients. Nothing here
shares code with the fast paths: the expert FFN is written out plainly and capacity overflow is decided
by a sequential scan over token copies in priority order.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moejax.experts.ffn import activation_fn
from moejax.routing.types import ExpertChoiceRouting, Routing

Params = dict[str, jax.Array]


def expert_forward(p: Params, x: jax.Array, *, kind: str, activation: str) -> jax.Array:
    """One expert (unstacked params) on x: [n, D] -> [n, D]."""
    act = activation_fn(activation)
    b = lambda name: p.get(name, 0.0)  # noqa: E731 - absent bias is zero
    if kind == "mlp":
        return act(x @ p["w_in"] + b("b_in")) @ p["w_out"] + b("b_out")
    if kind == "glu":
        return (act(x @ p["w_gate"] + b("b_gate")) * (x @ p["w_up"] + b("b_up"))) @ p["w_down"] + b("b_down")
    raise ValueError(f"expert_kind={kind!r}")


def expert_params(stacked: Params, e: int) -> Params:
    """Parameters of expert ``e`` out of stacked ``[E, ...]`` parameters."""
    return {name: value[e] for name, value in stacked.items()}


def copy_order(routing: Routing, priority: str) -> jax.Array:
    """int32[T*K] flat copies ``t * K + k`` sorted by (choice rank k, priority key, token t)."""
    t, k = routing.expert_index.shape
    kk, tt = jnp.meshgrid(jnp.arange(k), jnp.arange(t), indexing="xy")     # [T, K] each
    if priority == "position":
        key = jnp.zeros((t, k))
    elif priority == "score":
        score = jnp.max(jnp.where(routing.valid, routing.weight, -jnp.inf), axis=-1)
        key = jnp.broadcast_to(-score[:, None], (t, k))
    else:
        raise ValueError(f"priority={priority!r}")
    # lexsort: the last key is the primary one.
    return jnp.lexsort((tt.reshape(-1), key.reshape(-1), kk.reshape(-1)))


def keep_mask(routing: Routing, capacity: int | None, priority: str = "position") -> jax.Array:
    """bool[T, K]: walk the copies in priority order; a valid copy is kept while its expert has room."""
    t, k = routing.expert_index.shape
    if capacity is None:
        return routing.valid
    experts = routing.expert_index.reshape(-1)
    valid = routing.valid.reshape(-1)

    def step(counts, idx):
        e = experts[idx]
        ok = valid[idx] & (counts[e] < capacity)
        return counts.at[e].add(ok.astype(jnp.int32)), ok

    order = copy_order(jax.lax.stop_gradient(routing), priority)
    _, kept_in_order = jax.lax.scan(step, jnp.zeros((routing.num_experts,), jnp.int32), order)
    return jnp.zeros((t * k,), bool).at[order].set(kept_in_order).reshape(t, k)


def moe(x: jax.Array, routing: Routing | ExpertChoiceRouting, params: Params, *, kind: str, activation: str,
        capacity: int | None = None, priority: str = "position") -> jax.Array:
    """The routed part of an MoE layer, one expert at a time.

    Token choice: ``y_t = sum_k kept[t, k] * weight[t, k] * f_{e[t, k]}(x_t)``, with ``kept`` from
    :func:`keep_mask` (all valid copies when ``capacity`` is None). Expert choice:
    ``y_t = sum over slots (e, c) holding t of weight[e, c] * f_e(x_t)``.

    Args:
      x: [T, D]; params: stacked expert parameters ``[E, ...]``. Returns [T, D].
    """
    out = jnp.zeros_like(x)
    if isinstance(routing, ExpertChoiceRouting):
        for e in range(routing.num_experts):
            tokens = routing.token_index[e]
            y = expert_forward(expert_params(params, e), x[tokens], kind=kind, activation=activation)
            w = jnp.where(routing.valid[e], routing.weight[e], 0.0)
            out = out.at[tokens].add(w[:, None] * y)
        return out
    kept = keep_mask(routing, capacity, priority)
    for e in range(routing.num_experts):
        coeff = jnp.sum(jnp.where(kept & (routing.expert_index == e), routing.weight, 0.0), axis=-1)   # [T]
        out = out + coeff[:, None] * expert_forward(expert_params(params, e), x, kind=kind, activation=activation)
    return out


def zero_computation_moe(x: jax.Array, routing: Routing, params: Params, constant: Params | None, *, num_ffn: int,
                         num_zero: int, num_copy: int, kind: str, activation: str, capacity: int | None = None,
                         priority: str = "position") -> jax.Array:
    """MoE++: router outputs ``0 .. num_ffn-1`` are FFN experts, then ``num_zero`` zero, ``num_copy`` copy and
    the constant experts, one expert at a time.

    ``y_t = sum_k kept[t, k] * weight[t, k] * E_{e[t, k]}(x_t)`` with ``E`` the FFN (``params``), ``0``, ``x``, or
    ``a_1 x + a_2 v_j``, ``[a_1, a_2] = softmax(x @ constant['gate'][j])``, ``v_j = constant['vector'][j]``.
    ``kept``: every valid copy to a zero-computation expert (they have no buffer to overflow); the copies to FFN
    experts compete for slots alone, as in :func:`keep_mask` over the routing with the zero-computation copies
    removed (so with ``priority='score'`` a token ranks by its largest weight on an FFN expert).
    """
    to_zc = routing.valid & (routing.expert_index >= num_ffn)
    kept = routing.valid
    if capacity is not None:
        kept = keep_mask(routing.replace(valid=routing.valid & ~to_zc), capacity, priority) | to_zc
    out = jnp.zeros_like(x)
    for e in range(routing.num_experts):
        coeff = jnp.sum(jnp.where(kept & (routing.expert_index == e), routing.weight, 0.0), axis=-1)[:, None]
        if e < num_ffn:
            y = expert_forward(expert_params(params, e), x, kind=kind, activation=activation)
        elif e < num_ffn + num_zero:
            continue
        elif e < num_ffn + num_zero + num_copy:
            y = x
        else:
            j = e - num_ffn - num_zero - num_copy
            a = jax.nn.softmax(x @ constant["gate"][j], axis=-1)
            y = a[:, :1] * x + a[:, 1:] * constant["vector"][j]
        out = out + coeff * y
    return out


def dense_mixture(x: jax.Array, probs: jax.Array, params: Params, *, kind: str, activation: str) -> jax.Array:
    """``sum_e probs[:, e] * f_e(x)``: what top-E routing without renormalisation must equal. probs: [T, E]."""
    return sum(probs[:, e:e + 1] * expert_forward(expert_params(params, e), x, kind=kind, activation=activation)
               for e in range(probs.shape[-1]))


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul by masks: row r of group e is ``lhs[r] @ rhs[e]``; rows past all groups are zero."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[-1]), jnp.float32)
    for e in range(rhs.shape[0]):
        mask = (rows >= starts[e]) & (rows < ends[e])
        out = out + jnp.where(mask[:, None], jnp.dot(lhs, rhs[e], preferred_element_type=jnp.float32), 0.0)
    return out.astype(lhs.dtype)


def shared_ffn(x: jax.Array, params: Params, *, kind: str, activation: str, gate: jax.Array | None = None) -> jax.Array:
    """The shared FFN (unstacked params), optionally gated per token by ``sigmoid(x @ gate)`` with gate [D, 1]."""
    y = expert_forward(params, x, kind=kind, activation=activation)
    return y if gate is None else jax.nn.sigmoid(x @ gate) * y


def tree_get(tree: Any, path: str) -> Any:
    """``tree['a']['b']`` for ``path='a/b'``: helper for tests that pull layer parameters apart."""
    for part in path.split("/"):
        tree = tree[part]
    return tree
