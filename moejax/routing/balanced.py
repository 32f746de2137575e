"""Balanced assignment routers: Sinkhorn (S-BASE), BASE layers' linear assignment, capacity-bounded OT.

All three choose experts from a *plan* computed on the stop-gradient router logits ``float32[T, E]`` of the
whole routed group, and take their combine weights from the router's ordinary scores
(:func:`moejax.routing.scores_from_logits`, ``router.score``) of the chosen experts, so that the router
learns through the weights exactly as a top-k router does. Each returns an ordinary token-choice
:class:`Routing`, so every dispatcher and the oracle apply unchanged.

* :func:`sinkhorn_routing` — Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"
  (arXiv:2202.01169), S-BASE: BASE's exact assignment replaced by a few Sinkhorn iterations on
  ``exp(logits / temperature)``, then top-k of the balanced plan per token.
* :func:`base_routing` — Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models"
  (arXiv:2103.16716): a linear assignment maximising the total token-expert affinity under the constraint
  that every expert gets exactly ``T/E`` tokens, solved here by an auction algorithm (Bertsekas 1988) with
  epsilon-scaling, in ``jax.lax.while_loop`` (jit-able, no Python loop over tokens).
* :func:`sparse_ot_routing` — optimal transport with a capacity bound on each expert and a hard limit of
  ``C`` tokens per expert, our concrete form of "at most k tokens per expert" (the cardinality constraint of
  Liu et al. 2023, "Sparsity-Constrained Optimal Transport", arXiv:2209.15466); see its docstring.

Which plan is used at evaluation is the router's business (``router.balance_in_eval``): BASE uses the
assignment only in training and greedy top-1 at inference, because a balanced plan couples the tokens of a
batch and a served token should not depend on its neighbours.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin
from moejax.routing.topk import check_weights, finish_token_choice, scores_from_logits, top_k_routing
from moejax.routing.types import Routing


def _weights(logits: jax.Array, expert_index: jax.Array, valid: jax.Array, score: str, renormalize: bool,
             routed_scaling: float) -> tuple[jax.Array, jax.Array]:
    """(weight [T, K], probs [T, E]): the router's ordinary scores of the chosen experts."""
    scores = scores_from_logits(logits, score)
    weight = jnp.where(valid, jnp.take_along_axis(scores, expert_index, axis=-1), 0.0)
    if renormalize:
        weight = weight / (weight.sum(-1, keepdims=True) + 1e-20)
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdims=True)
    return weight * routed_scaling, probs


# ------------------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_plan(logits: jax.Array, iterations: int, temperature: float = 1.0) -> jax.Array:
    """float32[T, E] balanced plan: ``exp(logits / temperature)`` scaled to rows of 1 and columns of ``T/E``.

    Sinkhorn-Knopp in the log domain, ``iterations`` rounds of (columns to ``T/E``, then rows to 1), so the rows
    sum to 1 exactly and the column sums converge to ``T/E`` (the plan is the entropic optimal transport
    between a uniform token marginal and a uniform expert marginal). No gradient flows through the plan.
    """
    t, e = logits.shape
    if iterations < 1:
        raise ValueError(f"router.balance_iterations={iterations}: must be >= 1")
    lp = jax.lax.stop_gradient(logits.astype(jnp.float32)) / temperature
    log_col = math.log(t / e)

    def body(_, lp):
        lp = lp - jax.nn.logsumexp(lp, axis=0, keepdims=True) + log_col
        return lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)

    return jnp.exp(jax.lax.fori_loop(0, iterations, body, lp))


def sinkhorn_routing(logits: jax.Array, k: int, *, iterations: int = 20, temperature: float = 1.0,
                     score: str = "softmax", renormalize: bool = False, routed_scaling: float = 1.0) -> Routing:
    """S-BASE: each token takes the ``k`` experts with the largest entries of the Sinkhorn plan.

    Args:
      logits: float32[T, E] router logits; k: experts per token, ``1 <= K <= E``.
      iterations, temperature: of :func:`sinkhorn_plan`.
      score, renormalize, routed_scaling: the combine weights, as in :func:`top_k_routing` (the *unbalanced*
        router scores of the chosen experts; the plan only decides which experts).

    Returns:
      ``Routing`` with expert_index int32[T, K] (descending plan value), all slots valid.
    """
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={e}]")
    _, expert_index = jax.lax.top_k(sinkhorn_plan(logits, iterations, temperature), k)
    expert_index = expert_index.astype(jnp.int32)
    valid = jnp.ones((t, k), bool)
    weight, probs = _weights(logits, expert_index, valid, score, renormalize, routed_scaling)
    return finish_token_choice(logits, probs, expert_index, weight, valid)


# ---------------------------------------------------------------------------------------------- BASE


def expert_slots(num_tokens: int, num_experts: int) -> jax.Array:
    """int32[E]: ``T // E`` tokens per expert, plus one for the first ``T mod E`` experts (sums to ``T``)."""
    base, extra = divmod(num_tokens, num_experts)
    return (base + (jnp.arange(num_experts) < extra)).astype(jnp.int32)


def balanced_assignment(scores: jax.Array, *, precision: float = 1e-3, max_rounds: int | None = None) -> jax.Array:
    """int32[T]: the expert of each token in a max-affinity assignment with :func:`expert_slots` loads.

    Maximises ``sum_t scores[t, a_t]`` subject to expert ``e`` receiving exactly ``expert_slots(T, E)[e]``
    tokens (``T/E`` each when ``E`` divides ``T``). Solved by the Jacobi auction algorithm (Bertsekas 1988)
    on ``T`` bidders and the ``T`` expert slots, with epsilon-scaling: each phase divides ``eps`` by 8, from
    ``span/4`` down to ``precision * span / T`` with ``span = max(scores) - min(scores)``. An unassigned
    token bids for the cheapest slot of its best expert (value = score - slot price) the amount
    ``score - second best value + eps``, where the second best includes the same expert's second cheapest
    slot; an expert gives its cheapest slots to its highest new bids (the j-th highest bid takes the j-th
    cheapest slot if it beats that slot's price) and the displaced owners bid again. By the usual
    eps-complementary-slackness argument the result is within ``T * eps = precision * span`` of the optimal
    total affinity (exactly optimal when the scores are integers and ``precision * span < 1``).

    Every round is ``O(T E)`` vector work; phases run until every token holds a slot. ``max_rounds`` (default
    ``50 * T`` per phase) is a guard against float round-off stalling a phase: tokens still unassigned then are
    given the free slots in index order, so the loads are exact in every case (never reached in the tests).

    Args:
      scores: float[T, E] token-expert affinities (no gradient flows through the assignment).
    """
    t, e = scores.shape
    s = jax.lax.stop_gradient(scores.astype(jnp.float32))
    c = -(-t // e)
    avail = jnp.arange(c)[None, :] < expert_slots(t, e)[:, None]                     # bool[E, C]
    span = jnp.maximum(s.max() - s.min(), 1e-6)
    eps_final = precision * span / t
    phases = max(1, math.ceil(math.log(max(0.25 * t / precision, 1.0)) / math.log(8.0)) + 1)
    max_rounds = 50 * t if max_rounds is None else max_rounds
    tokens = jnp.arange(t)

    def phase(price, eps):
        owner = jnp.full((e, c), -1, jnp.int32)
        token_expert = jnp.full((t,), -1, jnp.int32)

        def cond(state):
            _, _, token_expert, rounds = state
            return jnp.any(token_expert < 0) & (rounds < max_rounds)

        def body(state):
            price, owner, token_expert, rounds = state
            order = jnp.argsort(price, axis=1)                                     # cheapest slots first
            sorted_price = jnp.take_along_axis(price, order, axis=1)              # [E, C]
            m1 = sorted_price[:, 0]
            m2 = sorted_price[:, 1] if c > 1 else jnp.full((e,), jnp.inf)
            value = s - m1[None, :]                                                # [T, E]
            best = jnp.argmax(value, axis=1)
            v1 = value[tokens, best]
            others = jnp.where(jax.nn.one_hot(best, e, dtype=bool), -jnp.inf, value).max(axis=1)
            v2 = jnp.maximum(others, s[tokens, best] - m2[best])
            v2 = jnp.maximum(v2, v1 - span - 1.0)      # a lone slot: any finite increment will do
            bid = s[tokens, best] - v2 + eps
            bidding = token_expert < 0
            bids = jnp.where(bidding[:, None] & jax.nn.one_hot(best, e, dtype=bool), bid[:, None], -jnp.inf)
            top_bid, top_token = jax.lax.top_k(bids.T, c)                          # [E, C] highest first
            accept = top_bid > sorted_price                                        # j-th bid vs j-th cheapest
            rows = jnp.broadcast_to(jnp.arange(e)[:, None], (e, c))
            old = owner[rows, order]
            displaced = jnp.where(accept & (old >= 0), old, t)
            token_expert = token_expert.at[displaced.reshape(-1)].set(-1, mode="drop")
            winners = jnp.where(accept, top_token, t)
            token_expert = token_expert.at[winners.reshape(-1)].set(rows.reshape(-1), mode="drop")
            owner = owner.at[rows, order].set(jnp.where(accept, top_token, old))
            price = price.at[rows, order].set(jnp.where(accept, top_bid, sorted_price))
            return price, owner, token_expert, rounds + 1

        price, owner, token_expert, _ = jax.lax.while_loop(cond, body, (price, owner, token_expert, 0))
        return price, owner, token_expert

    def one_phase(i, carry):
        # One traced phase for all of them (compiled once): eps = span/4 / 8^i, the last phase eps_final.
        eps = jnp.where(i < phases - 1, jnp.maximum(0.25 * span / 8.0 ** i, eps_final), eps_final)
        return phase(carry[0], eps)

    init = (jnp.where(avail, 0.0, jnp.inf), jnp.full((e, c), -1, jnp.int32), jnp.full((t,), -1, jnp.int32))
    price, owner, token_expert = jax.lax.fori_loop(0, phases, one_phase, init)
    # Guard (see docstring): pair the n-th unassigned token with the n-th free slot.
    free = (owner < 0) & avail
    free_expert = jnp.argsort(~free.reshape(-1), stable=True) // c                 # free slots first
    lost = jnp.argsort(token_expert >= 0, stable=True)                             # unassigned tokens first
    rank = jnp.zeros((t,), jnp.int32).at[lost].set(jnp.arange(t, dtype=jnp.int32))
    fill = free_expert[jnp.minimum(rank, free_expert.shape[0] - 1)]
    return jnp.where(token_expert < 0, fill, token_expert).astype(jnp.int32)


def base_routing(logits: jax.Array, *, score: str = "sigmoid", routed_scaling: float = 1.0,
                 precision: float = 1e-3) -> Routing:
    """BASE layers: each token gets one expert from :func:`balanced_assignment` of the logits.

    The affinity maximised is the logit ``h_t . w_e`` itself, as in the paper; the combine weight is the
    router score of the assigned expert — ``sigmoid(h_t . w_e)`` with ``score='sigmoid'``, BASE's gate (the
    paper adds the expert output to the residual stream scaled by it). ``K = 1``.

    Returns:
      ``Routing`` with expert_index int32[T, 1]; every expert gets exactly :func:`expert_slots` tokens.
    """
    expert_index = balanced_assignment(logits, precision=precision)[:, None]
    valid = jnp.ones(expert_index.shape, bool)
    weight, probs = _weights(logits, expert_index, valid, score, False, routed_scaling)
    return finish_token_choice(logits, probs, expert_index, weight, valid)


# ------------------------------------------------------------------------------- capacity-bounded OT


def capped_transport_plan(logits: jax.Array, column_bound: float, iterations: int,
                          temperature: float = 1.0) -> jax.Array:
    """float32[T, E] entropic OT plan with rows summing to 1 and every column summing to at most ``column_bound``.

    Solves ``max <P, logits> + temperature * H(P)`` over ``P >= 0`` with ``P 1 = 1`` and ``P^T 1 <= b``
    (``b = column_bound``, feasible iff ``E b >= T``) by exact block-coordinate ascent on its dual: the
    plan is ``P = exp(logits / temperature + f_t + g_e)`` with the row potential ``f`` set so that rows sum
    to 1 and the column potential ``g <= 0`` (the multiplier of an inequality) set to
    ``min(0, log b - logsumexp_t(logits / temperature + f))`` — Sinkhorn with a clipped column update, the
    iterative scaling of Benamou et al. 2015 / Chizat et al. 2018 for a capacity bound. Rows sum to 1
    exactly; the column bound holds in the limit. No gradient flows through the plan.
    """
    if iterations < 1:
        raise ValueError(f"router.balance_iterations={iterations}: must be >= 1")
    s = jax.lax.stop_gradient(logits.astype(jnp.float32)) / temperature
    log_b = math.log(column_bound)

    def body(_, g):
        f = -jax.nn.logsumexp(s + g[None, :], axis=1)
        return jnp.minimum(0.0, log_b - jax.nn.logsumexp(s + f[:, None], axis=0))

    g = jax.lax.fori_loop(0, iterations, body, jnp.zeros((s.shape[1],), jnp.float32))
    f = -jax.nn.logsumexp(s + g[None, :], axis=1)
    return jnp.exp(s + f[:, None] + g[None, :])


def sparse_ot_routing(logits: jax.Array, k: int, capacity: int, *, iterations: int = 20, temperature: float = 1.0,
                      score: str = "softmax", renormalize: bool = False, routed_scaling: float = 1.0) -> Routing:
    """Capacity-constrained OT routing: at most ``K`` experts per token and at most ``C`` tokens per expert.

    The cardinality-constrained transport of Liu et al. 2023 (each expert matched with at most ``C`` tokens)
    in the following exact form:

    1. ``P = capped_transport_plan(logits, C / K, iterations, temperature)``: one unit of mass per token,
       at most ``C / K`` units per expert (an expert's share of the ``T K`` token copies at capacity ``C``).
    2. Each token proposes the ``K`` experts with the largest ``P[t, :]``.
    3. Each expert keeps the ``C`` proposals with the largest ``P[t, e]`` (ties: lower token index); the rest
       are marked invalid — the token is not sent there (it may end with no expert, like a capacity drop).

    So the sparsity (``<= C`` nonzeros per expert column) is exact, and the plan makes step 3 rarely bind.
    This is *not* the quadratically regularised, k-sparse dual of Liu et al.; it keeps the entropic solver
    of the other balanced routers and imposes the cardinality by construction.

    Args:
      logits: float32[T, E]; k: ``K``; capacity: ``C``, ``1 <= C <= T``, with ``E C >= T K`` for a feasible
        plan (checked by the config).
      iterations, temperature: of :func:`capped_transport_plan`.
      score, renormalize, routed_scaling: the combine weights (router scores of the kept experts;
        ``renormalize`` over the kept ones).

    Returns:
      ``Routing`` with expert_index int32[T, K] (descending plan value) and valid bool[T, K].
    """
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={e}]")
    if not 1 <= capacity <= t:
        raise ValueError(f"capacity={capacity}: sparse_ot routing needs 1 <= C <= T={t}")
    plan = capped_transport_plan(logits, capacity / k, iterations, temperature)
    value, expert_index = jax.lax.top_k(plan, k)
    proposed = jnp.zeros((t, e), bool).at[jnp.arange(t)[:, None], expert_index].set(True)
    ranked = jnp.where(proposed, plan, -1.0)
    rank = jnp.argsort(jnp.argsort(-ranked, axis=0, stable=True), axis=0, stable=True)   # [T, E] rank per expert
    kept = proposed & (rank < capacity)
    valid = jnp.take_along_axis(kept, expert_index, axis=-1)
    expert_index = expert_index.astype(jnp.int32)
    weight, probs = _weights(logits, expert_index, valid, score, renormalize, routed_scaling)
    return finish_token_choice(logits, probs, expert_index, weight, valid)


# ------------------------------------------------------------------------------------ the router kinds


@dataclasses.dataclass(frozen=True)
class _Balanced(plugin.RouterKind):
    """Fields every balanced kind has: ``score`` and ``routed_scaling`` of the combine weights, and
    ``balance_in_eval``: use the plan in evaluation too (default: greedy top-k of the scores, BASE's rule, so
    that a served token's experts do not depend on its batch)."""

    score: str = "softmax"
    routed_scaling: float = 1.0
    balance_in_eval: bool = False

    def _check(self, renormalize: bool = False) -> None:
        check_weights(self.score, renormalize, self.routed_scaling)
        if not isinstance(self.balance_in_eval, bool):
            plugin.fail("balance_in_eval", self.balance_in_eval, "must be a bool")

    def _plan_iterations(self, iterations: object, temperature: object) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            plugin.fail("balance_iterations", iterations, "must be an integer >= 1")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            plugin.fail("balance_temperature", temperature, "must be a finite number > 0")

    def route(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        if call.train or self.balance_in_eval:
            return self.balanced(logits, call)
        return top_k_routing(logits, call.k, score=self.score, renormalize=getattr(self, "renormalize", False),
                             routed_scaling=self.routed_scaling)

    def balanced(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _EntropicPlan(_Balanced):
    """The fields of the kinds whose plan is an entropic transport solved iteratively (``sinkhorn``, ``sparse_ot``):
    ``renormalize`` of the kept weights, ``balance_iterations`` and ``balance_temperature`` of the solver."""

    renormalize: bool = False
    balance_iterations: int = 20
    balance_temperature: float = 1.0

    def __post_init__(self) -> None:
        self._check(self.renormalize)
        self._plan_iterations(self.balance_iterations, self.balance_temperature)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class Sinkhorn(_EntropicPlan):
    """``sinkhorn`` (S-BASE): top-k of a Sinkhorn-balanced plan (:func:`sinkhorn_routing`) in training."""

    name: ClassVar[str] = "sinkhorn"

    def balanced(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        return sinkhorn_routing(logits, call.k, iterations=self.balance_iterations,
                                temperature=self.balance_temperature, score=self.score,
                                renormalize=self.renormalize, routed_scaling=self.routed_scaling)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class Base(_Balanced):
    """``base`` (BASE layers): a balanced linear assignment, exactly ``T/E`` tokens per expert, ``k=1``."""

    name: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        self._check()

    def check_router(self, k: int) -> None:
        if k != 1:
            plugin.fail("k", k, "kind='base' assigns exactly one expert per token (k=1)")

    def balanced(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        return base_routing(logits, score=self.score, routed_scaling=self.routed_scaling)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class SparseOT(_EntropicPlan):
    """``sparse_ot``: capacity-bounded OT, at most ``C`` tokens per expert (:func:`sparse_ot_routing`); needs a
    capacity factor >= 1 (or None) wherever it routes with its plan."""

    name: ClassVar[str] = "sparse_ot"

    def check_layer(self, layer: plugin.LayerFacts) -> None:
        super().check_layer(layer)
        # The capped plan needs E * C >= T * k, i.e. a capacity factor >= 1.
        names = ("capacity_factor", "eval_capacity_factor") if self.balance_in_eval else ("capacity_factor",)
        for name, cf in zip(names, layer.capacity_factors):
            if cf is not None and cf < 1:
                raise ValueError(f"dispatch.{name}={cf!r}: router.kind='sparse_ot' needs a capacity factor >= 1 "
                                 f"(or None)")

    def balanced(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        if call.capacity is None:
            raise ValueError("capacity: router.kind='sparse_ot' needs the expert capacity C")
        return sparse_ot_routing(logits, call.k, call.capacity, iterations=self.balance_iterations,
                                 temperature=self.balance_temperature, score=self.score,
                                 renormalize=self.renormalize, routed_scaling=self.routed_scaling)
