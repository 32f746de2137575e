"""Routers that do not learn: hash routing and random routing (THOR's stochastic experts).

Both produce an ordinary token-choice :class:`Routing`, so every dispatcher and the oracle apply
unchanged. Their combine weights are constants (``1/K`` per slot, i.e. ``1`` for ``K = 1`` as in both
papers), so no gradient reaches a router. ``probs`` is the routing itself (the weights scattered to
``[T, E]``): entropy, confidence and load describe the actual assignment, and there is no z-loss
because there are no logits.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.hashing import fmix32 as _fmix32
from moejax.routing import plugin
from moejax.routing.types import Routing


def hash_scores(token_ids: jax.Array, num_experts: int, seed: int = 0) -> jax.Array:
    """float32[T, E] pseudo-random scores, a fixed function of ``(token id, expert, seed)``.

    Ranking experts by these scores gives each id a fixed, uniformly random ordered list of distinct
    experts. The scores keep the top 24 bits of the hash so that they are exact in float32.
    """
    ids = token_ids.astype(jnp.uint32)[:, None]
    experts = jnp.arange(num_experts, dtype=jnp.uint32)[None, :]
    h = _fmix32(ids * jnp.uint32(num_experts) + experts + _fmix32(jnp.uint32(seed) + jnp.uint32(0x9E3779B9)))
    h = _fmix32(h ^ (ids * jnp.uint32(0x27D4EB2F)))
    return (h >> 8).astype(jnp.float32)


def routing_from_assignment(expert_index: jax.Array, num_experts: int) -> Routing:
    """A ``Routing`` with weight ``1/K`` on each of the K given experts. expert_index: int32[T, K]."""
    t, k = expert_index.shape
    valid = jnp.ones((t, k), bool)
    weight = jnp.full((t, k), 1.0 / k, jnp.float32)
    probs = jnp.einsum("tk,tke->te", weight, jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32))
    return Routing(expert_index=expert_index.astype(jnp.int32), weight=weight, valid=valid, probs=probs,
                   num_experts=num_experts)


def hash_routing(token_ids: jax.Array, num_experts: int, k: int = 1, *, seed: int = 0) -> Routing:
    """Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv:2106.04426).

    Each token id is sent to a fixed expert chosen by a hash of the id, decided before training and
    never learned. The paper's main variant is a random hash of the token id with ``K = 1`` and no gate
    (the expert output is used as is); that is ``k=1`` here (weight 1). For ``k > 1`` each id gets
    ``K`` *distinct* hashed experts averaged with weight ``1/K`` — our choice; the paper's MultiHash
    instead splits the hidden vector into segments, one hash each, which is not ordinary routing.
    The paper's balanced and clustered hashes need corpus statistics and are not implemented.

    Args:
      token_ids: int[T] the token id (vocabulary index) of each token — or, when the caller has none,
        any fixed integer per token such as its position (see :class:`moejax.routing.Router`).
      num_experts: ``E``; k: ``K`` distinct experts per token, ``1 <= K <= E``; seed: selects the hash.

    Returns:
      ``Routing`` with expert_index int32[T, K] (a fixed function of the id), weight ``1/K``, all valid.
    """
    if not 1 <= k <= num_experts:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={num_experts}]")
    _, expert_index = jax.lax.top_k(hash_scores(token_ids, num_experts, seed), k)
    return routing_from_assignment(expert_index, num_experts)


def random_routing(key: jax.Array, num_tokens: int, num_experts: int, k: int = 1) -> Routing:
    """Each token gets ``K`` distinct experts drawn uniformly at random, weight ``1/K`` each.

    With ``K = 1`` this is THOR's stochastic expert activation (Zuo et al. 2022, "Taming Sparsely
    Activated Transformer with Stochastic Experts", arXiv:2110.04260): every token goes to one
    uniformly random expert, in training and in inference, with no router and no gate. It is also the
    random-routing baseline of the routing literature. We draw independently per token; a draw
    shared by a whole batch (a coarser granularity some stochastic-expert setups use) is not what this
    function does. Pair it with :func:`consistency_loss`.

    Args:
      key: PRNG key; num_tokens: ``T``; num_experts: ``E``; k: ``1 <= K <= E``.
    """
    if not 1 <= k <= num_experts:
        raise ValueError(f"router.k={k}: must be in [1, num_experts={num_experts}]")
    _, expert_index = jax.lax.top_k(jax.random.uniform(key, (num_tokens, num_experts)), k)
    return routing_from_assignment(expert_index, num_experts)


def consistency_loss(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
    """THOR's consistency regulariser between two stochastic forward passes.

    ``CR = 1/2 (KL(p_a || p_b) + KL(p_b || p_a))`` with ``p = softmax(logits)`` over the last axis,
    averaged over all leading axes (tokens or examples). THOR trains on ``CE(p_a) + CE(p_b) + alpha * CR``,
    where ``a`` and ``b`` are the model outputs of the same batch under two independent random routings
    (two different ``'jitter'`` RNG keys); both directions carry gradient, as in the paper.

    Args:
      logits_a, logits_b: float[..., V] model output logits of the two passes.

    Returns:
      float32[], zero iff the two distributions agree.
    """
    la = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    lb = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    kl_ab = jnp.sum(jnp.exp(la) * (la - lb), axis=-1)
    kl_ba = jnp.sum(jnp.exp(lb) * (lb - la), axis=-1)
    return jnp.mean(0.5 * (kl_ab + kl_ba))


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        plugin.fail("seed", seed, "must be an integer >= 0")


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class Hash(plugin.RouterKind):
    """``hash`` (Roller et al. 2021): a fixed hash (``seed``) of each token's id (:func:`hash_routing`); without
    token ids in the call, of the token's index in the routed group. Nothing is learned."""

    name: ClassVar[str] = "hash"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.TOKEN_CHOICE})
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed(self.seed)

    def route(self, logits: None, call: plugin.RouteCall) -> Routing:
        ids = jnp.arange(call.num_tokens) if call.token_ids is None else call.token_ids.reshape(-1)
        return hash_routing(ids, call.num_experts, call.k, seed=self.seed)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class Random(plugin.RouterKind):
    """``random`` (THOR's stochastic experts): uniformly random experts per token, in training and evaluation
    (:func:`random_routing`), from the ``'jitter'`` RNG, or a fixed draw from ``seed`` when the call has none."""

    name: ClassVar[str] = "random"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.TOKEN_CHOICE})
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed(self.seed)

    def route(self, logits: None, call: plugin.RouteCall) -> Routing:
        key = call.module.make_rng("jitter") if call.module.has_rng("jitter") else jax.random.key(self.seed)
        return random_routing(key, call.num_tokens, call.num_experts, call.k)
