"""``router.kind='ksparse_ot'``: routing by k-sparse quadratically regularised OT (Liu, Puigcerver, Blondel 2023).

The paper's MoE motivation: "OT can be used to match input tokens such as image patches with expert models", and
"Cardinality constraints ensure that at most k tokens are matched with an expert". Here the plan of
:mod:`moejax.routing.ksparse_ot` is computed between the ``T`` tokens (rows, mass 1 each) and the ``E`` experts
(columns, mass ``T/E`` each: a balanced load) with cost ``-logits`` (stop-gradient) and at most ``c`` nonzeros per
expert column, ``c = router.ot_tokens_per_expert`` or, when that is None, the dispatch's expert capacity ``C``.

What is ours, not the paper's (its MoE setup was not read in detail): the marginals (uniform tokens, balanced
experts), the cost (negative router logits), the solver (accelerated semi-dual ascent, a fixed iteration budget
and tolerance), and how a plan becomes a token-choice routing:

1. each token takes the ``K = router.k`` experts with the largest plan entries in its row;
2. a slot whose plan entry is zero is invalid, so a token may use fewer than ``K`` experts (``dynamic_k``) and an
   expert receives at most ``c`` tokens — the plan's cardinality constraint carried into the routing exactly
   (with a converged plan a token always has at least one nonzero entry; an unconverged one may leave a token
   with none, which is then dropped like a capacity overflow);
3. the combine weights are the router's ordinary scores of the kept experts (``router.score``), as for the other
   balanced kinds (:mod:`moejax.routing.balanced`), so the router learns through them exactly as top-k does.

Like BASE and Sinkhorn, the plan couples the tokens of a batch; in evaluation the kind routes by greedy top-k of
the scores unless ``router.balance_in_eval``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import ksparse_ot, plugin
from moejax.routing.balanced import _Balanced, _weights
from moejax.routing.topk import finish_token_choice
from moejax.routing.types import Routing


def ksparse_ot_plan(logits: jax.Array, tokens_per_expert: int, *, gamma: float = 1.0, max_iterations: int = 100,
                    tolerance: float = 1e-3, method: str = "agd") -> ksparse_ot.KSparseOTSolution:
    """The k-sparse OT plan between ``T`` tokens (mass 1 each) and ``E`` experts (mass ``T/E`` each).

    Args:
      logits: float32[T, E] (no gradient flows into the plan); tokens_per_expert: ``c``, the most nonzeros per
        expert column, ``E c >= T``; gamma, max_iterations, tolerance, method: of
        :func:`moejax.routing.ksparse_ot.solve_semi_dual` (tolerance on the relative token-marginal error).

    Returns:
      the solver's :class:`~moejax.routing.ksparse_ot.KSparseOTSolution`; ``plan`` is float32[T, E].
    """
    t, e = logits.shape
    c = min(int(tokens_per_expert), t)
    if e * c < t:
        raise ValueError(f"router.ot_tokens_per_expert={tokens_per_expert}: E * c = {e * c} < T = {t} tokens; "
                         f"no plan covers every token")
    cost = -jax.lax.stop_gradient(logits.astype(jnp.float32))
    a = jnp.ones((t,), jnp.float32)
    b = jnp.full((e,), t / e, jnp.float32)
    return ksparse_ot.solve_semi_dual(cost, a, b, c, gamma, max_iter=max_iterations, tol=tolerance, method=method)


def ksparse_ot_routing(logits: jax.Array, k: int, tokens_per_expert: int, *, gamma: float = 1.0,
                       max_iterations: int = 100, tolerance: float = 1e-3, method: str = "agd",
                       score: str = "softmax", renormalize: bool = False, routed_scaling: float = 1.0) -> Routing:
    """Token-choice routing from the k-sparse OT plan: at most ``K`` experts per token, ``c`` tokens per expert.

    Args:
      logits: float32[T, E]; k: ``K`` slots per token; tokens_per_expert: ``c``; the solver's options as in
        :func:`ksparse_ot_plan`; score, renormalize, routed_scaling: the combine weights (router scores of the
        kept experts).

    Returns:
      ``Routing`` with expert_index int32[T, K] (descending plan entry), valid bool[T, K] (plan entry > 0).
    """
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={e}]")
    plan = ksparse_ot_plan(logits, tokens_per_expert, gamma=gamma, max_iterations=max_iterations,
                           tolerance=tolerance, method=method).plan
    value, expert_index = jax.lax.top_k(plan, k)
    valid = value > 0.0
    expert_index = expert_index.astype(jnp.int32)
    weight, probs = _weights(logits, expert_index, valid, score, renormalize, routed_scaling)
    return finish_token_choice(logits, probs, expert_index, weight, valid)


def _positive(field: str, value: object, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        plugin.fail(field, value, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class KSparseOT(_Balanced):
    """``ksparse_ot``: top-k of a k-sparse quadratically regularised OT plan (:func:`ksparse_ot_routing`).

    Fields: ``ot_tokens_per_expert`` (``c``, the most tokens an expert is matched with; None: the dispatch's
    capacity ``C``), ``ot_gamma`` (the quadratic regularisation, in logit units), ``ot_max_iterations`` and
    ``ot_tolerance`` (the solver's budget and its stopping rule on the token-marginal error), ``ot_method``
    (``agd`` or ``lbfgs``), ``renormalize``, and the balanced kinds' ``score``, ``routed_scaling``,
    ``balance_in_eval``.
    """

    name: ClassVar[str] = "ksparse_ot"
    dynamic_k: ClassVar[bool] = True
    renormalize: bool = False
    ot_tokens_per_expert: int | None = None
    ot_gamma: float = 1.0
    ot_max_iterations: int = 100
    ot_tolerance: float = 1e-3
    ot_method: str = "agd"

    def __post_init__(self) -> None:
        self._check(self.renormalize)
        c = self.ot_tokens_per_expert
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            plugin.fail("ot_tokens_per_expert", c, "must be None (the expert capacity) or an integer >= 1")
        _positive("ot_gamma", self.ot_gamma)
        n = self.ot_max_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            plugin.fail("ot_max_iterations", n, "must be an integer >= 1")
        _positive("ot_tolerance", self.ot_tolerance, allow_zero=True)
        if self.ot_method not in ksparse_ot.METHODS:
            plugin.fail("ot_method", self.ot_method, f"must be one of {list(ksparse_ot.METHODS)}")

    def check_layer(self, layer: plugin.LayerFacts) -> None:
        super().check_layer(layer)
        if self.ot_tokens_per_expert is None:
            # c = C = ceil(cf T K / E) must reach T / E for a plan to cover every token: cf * K >= 1.
            names = ("capacity_factor", "eval_capacity_factor") if self.balance_in_eval else ("capacity_factor",)
            for name, cf in zip(names, layer.capacity_factors):
                if cf is not None and cf * layer.k < 1:
                    raise ValueError(f"dispatch.{name}={cf!r}: router.kind='ksparse_ot' with "
                                     f"router.ot_tokens_per_expert=None needs capacity_factor * k >= 1 (or None)")

    def balanced(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        c = self.ot_tokens_per_expert
        if c is None:
            if call.capacity is None:
                raise ValueError("router.ot_tokens_per_expert=None: router.kind='ksparse_ot' then needs the expert "
                                 "capacity C from the dispatch; set ot_tokens_per_expert")
            c = call.capacity
        return ksparse_ot_routing(logits, call.k, c, gamma=self.ot_gamma, max_iterations=self.ot_max_iterations,
                                  tolerance=self.ot_tolerance, method=self.ot_method, score=self.score,
                                  renormalize=self.renormalize, routed_scaling=self.routed_scaling)
