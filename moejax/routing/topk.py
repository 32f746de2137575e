"""Token-choice top-k routing (Switch, GShard, Mixtral, Qwen-MoE, DeepSeek-V2/V3 variants)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin
from moejax.routing.types import Routing

SCORES = ("softmax", "sigmoid")


def scores_from_logits(logits: jax.Array, score: str) -> jax.Array:
    """float32[T, E] affinities: ``softmax`` over experts or per-expert ``sigmoid``."""
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if score == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"router.score={score!r}: must be 'softmax' or 'sigmoid'")


def limit_to_top_groups(scores: jax.Array, num_groups: int, top_groups: int, group_score: str) -> jax.Array:
    """Masks (to -inf) every expert outside the ``top_groups`` best of ``num_groups`` equal groups.

    A group's score is the ``max`` of its experts' scores (DeepSeek-V2) or the sum of its two largest
    (``top2_sum``, DeepSeek-V3). scores: float32[T, E] -> float32[T, E].
    """
    t, e = scores.shape
    grouped = scores.reshape(t, num_groups, e // num_groups)
    if group_score == "max":
        gscore = grouped.max(-1)
    elif group_score == "top2_sum":
        gscore = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        raise ValueError(f"router.group_score={group_score!r}: must be 'max' or 'top2_sum'")
    _, keep = jax.lax.top_k(gscore, top_groups)                              # [T, top_groups]
    group_mask = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
    return jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(t, e)


def top_k_routing(
    logits: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = False,
    routed_scaling: float = 1.0,
    selection_bias: jax.Array | None = None,
    num_groups: int = 1,
    top_groups: int | None = None,
    group_score: str = "max",
    selection_noise: jax.Array | None = None,
) -> Routing:
    """Each token picks its ``k`` highest-scoring experts.

    Args:
      logits: float32[T, E] router logits.
      k: experts per token, ``1 <= k <= E``.
      score: ``softmax`` (probabilities over all E experts) or ``sigmoid`` (independent affinities).
      renormalize: divide the selected scores by their sum (Mixtral/Qwen, DeepSeek-V3) instead of using
        them as they are (Switch/GShard).
      routed_scaling: multiplies the final weights (DeepSeek-V3's routed scaling factor).
      selection_bias: optional float32[E] added to the scores for choosing experts only; the weights
        come from the unbiased scores and no gradient flows into the bias (aux-loss-free balancing).
      num_groups, top_groups, group_score: group-limited selection, see :func:`limit_to_top_groups`.
      selection_noise: optional float32[T, E] added to the *logits* for choosing experts only (e.g.
        Gumbel noise: top-k of ``logits + Gumbel`` samples k experts without replacement from the softmax,
        Kool et al. 2019); the weights come from the noise-free scores.

    Returns:
      ``Routing`` with expert_index int32[T, K], weight float32[T, K], every slot valid, and the
      auxiliary losses computed on ``probs`` (softmax probabilities, or the sigmoid affinities
      normalised to sum to one per token).
    """
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={e}]")
    if e % num_groups:
        raise ValueError(f"router.num_groups={num_groups}: must divide num_experts={e}")
    scores = scores_from_logits(logits, score)
    select = scores
    if selection_noise is not None:
        select = scores_from_logits(logits + jax.lax.stop_gradient(selection_noise), score)
    if selection_bias is not None:
        select = select + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    if top_groups is not None and top_groups < num_groups:
        select = limit_to_top_groups(select, num_groups, top_groups, group_score)
    return top_k_of_selection(logits, scores, select, k, score=score, renormalize=renormalize,
                              routed_scaling=routed_scaling)


def top_k_of_selection(logits: jax.Array, scores: jax.Array, select: jax.Array, k: int, *, score: str,
                       renormalize: bool, routed_scaling: float) -> Routing:
    """The top-k rule once the selection scores are known: experts = top-k of ``select`` float32[T, E], weights
    from ``scores`` float32[T, E] (``score``'s affinities of ``logits``), optionally renormalised and scaled."""
    t = logits.shape[0]
    _, expert_index = jax.lax.top_k(select, k)
    weight = jnp.take_along_axis(scores, expert_index, axis=-1)
    if renormalize:
        weight = weight / (weight.sum(-1, keepdims=True) + 1e-20)
    weight = weight * routed_scaling
    valid = jnp.ones((t, k), bool)
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdims=True)
    return finish_token_choice(logits, probs, expert_index.astype(jnp.int32), weight, valid)


def finish_token_choice(logits: jax.Array, probs: jax.Array, expert_index: jax.Array, weight: jax.Array,
                        valid: jax.Array) -> Routing:
    """Assembles a ``Routing`` from a routing decision (the weights of empty slots zeroed).

    Routers other than top-k (dynamic-k, hash, ...) call this so that every token-choice router builds its value
    the same way; losses and statistics are computed downstream from it. Shapes: logits, probs float32[T, E]; the
    rest [T, K]. ``logits`` is unused (the layer's losses read the router's own logits).
    """
    del logits
    weight = jnp.where(valid, weight, 0.0)
    return Routing(expert_index=expert_index, weight=weight, valid=valid, probs=probs, num_experts=probs.shape[-1])


def check_weights(score: str, renormalize: bool, routed_scaling: float) -> None:
    """Validates the combine-weight fields that several router kinds share (``router.score`` etc.)."""
    if score not in SCORES:
        plugin.fail("score", score, f"must be one of {list(SCORES)}")
    if not isinstance(renormalize, bool):
        plugin.fail("renormalize", renormalize, "must be a bool")
    if isinstance(routed_scaling, bool) or not isinstance(routed_scaling, (int, float)) \
            or not math.isfinite(routed_scaling) or routed_scaling <= 0:
        plugin.fail("routed_scaling", routed_scaling, "must be a finite number > 0")


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class TopK(plugin.RouterKind):
    """``topk``: each token takes its ``k`` highest-scoring experts (Switch, GShard, Mixtral, Qwen, DeepSeek).

    ``score``: ``softmax`` over experts or per-expert ``sigmoid`` (DeepSeek-V3); ``renormalize``: the chosen
    weights sum to one (Mixtral/Qwen) instead of the raw scores (Switch/GShard); ``routed_scaling``: multiplies
    the weights (DeepSeek-V3). Takes every transform: Gumbel noise on the selection logits, selection bias and
    group limits on the selection scores.
    """

    name: ClassVar[str] = "topk"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED, plugin.TOKEN_CHOICE, plugin.SELECTION_LOGITS,
                                                  plugin.SELECTION_SCORES})
    score: str = "softmax"
    renormalize: bool = False
    routed_scaling: float = 1.0

    def __post_init__(self) -> None:
        check_weights(self.score, self.renormalize, self.routed_scaling)

    def route(self, logits: jax.Array, call: plugin.RouteCall) -> Routing:
        t, e = logits.shape
        if not 1 <= call.k <= e:
            raise ValueError(f"router.k={call.k}: must be in [1, num_experts={e}]")
        scores = scores_from_logits(logits, self.score)
        noisy = call.selection_logits(logits)
        select = scores if noisy is logits else scores_from_logits(noisy, self.score)
        return top_k_of_selection(logits, scores, call.selection_scores(select), call.k, score=self.score,
                                  renormalize=self.renormalize, routed_scaling=self.routed_scaling)
