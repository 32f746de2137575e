"""The DeepSeekMoE paper's redundancy test: disable each token's top routed experts, measure the loss increase.

Dai et al. 2024 (Section 4.5, "lower redundancy among routed experts") mask, for every token, a ratio of the
routed experts with the highest routing probability and let the router pick its top-K among the remaining
ones; a model whose routed experts are more specialised (less redundant) suffers a larger loss increase.

Here the mask is applied at evaluation without touching the library: :func:`masked_top_experts` intercepts
every :class:`~moejax.routing.Router` call (``flax.linen.intercept_methods``), takes the router's logits,
and re-routes with :func:`~moejax.routing.top_k_routing` using a per-token ``selection_bias`` of ``-1e9`` on
the ``r`` highest-scoring experts. The selection bias only changes which experts are chosen; the combine
weights stay the unmasked softmax scores of the chosen experts (renormalised if the config says so), as in
the paper. Shared experts are untouched. ``r = round(ratio * E)`` per layer.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import Router, scores_from_logits, top_k_routing


def masked_routing(logits: jax.Array, k: int, r: int, cfg: Any):
    """Top-``k`` routing of logits float32[T, E] that never picks a token's ``r`` best experts."""
    scores = scores_from_logits(logits, cfg.score)
    _, top = jax.lax.top_k(scores, r)
    bias = -1e9 * jax.nn.one_hot(top, scores.shape[-1], dtype=jnp.float32).sum(-2)
    return top_k_routing(logits, k, score=cfg.score, renormalize=cfg.renormalize,
                         routed_scaling=cfg.routed_scaling, selection_bias=bias)


@contextlib.contextmanager
def masked_top_experts(ratio: float) -> Iterator[None]:
    """Inside this context every top-k ``Router`` skips each token's ``round(ratio * E)`` best experts."""

    def interceptor(next_fun, args, kwargs, context):
        if not (isinstance(context.module, Router) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        routing, logits = out if kwargs.get("return_logits") else (out, None)
        if logits is None:
            raise ValueError("redundancy test: the router has no logits (hash/random routing)")
        e, k = logits.shape[-1], routing.expert_index.shape[-1]
        r = int(round(ratio * e))
        if r + k > e:
            raise ValueError(f"ratio={ratio}: masking {r} of {e} experts leaves fewer than k={k}")
        if r == 0:
            return out
        new = masked_routing(logits, k, r, context.module.config)
        return (new, logits) if kwargs.get("return_logits") else new

    with nn.intercept_methods(interceptor):
        yield


def eval_losses(model: Any, variables: dict, batches: Iterable[dict], max_batches: int,
                ratios: Sequence[float]) -> list[float]:
    """Mean next-byte cross-entropy (nats) over the first ``max_batches`` eval batches, one per masking ratio
    (0 = no masking); all ratios are evaluated in one compiled function."""

    @jax.jit
    def sums(tokens, mask):
        m = mask.astype(jnp.float32)  # float32[B, L]: real (not padding) targets
        out = []
        for ratio in ratios:
            with masked_top_experts(ratio):
                logits, _ = model.apply(variables, tokens[:, :-1], deterministic=True)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            out.append(jnp.sum(ce * m))
        return jnp.stack(out), jnp.sum(m)

    total, count = np.zeros(len(ratios)), 0.0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        s, c = sums(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
        total, count = total + np.asarray(s, np.float64), count + float(c)
    return (total / max(count, 1.0)).tolist()


RATIOS = (1 / 8, 2 / 8)  # fractions of the routed experts masked per token
