"""The DeepSeekMoE paper's redundancy test: disable each token's top routed experts, measure the loss increase.

Dai et al. 2024 (Section 4.5, "lower redundancy among routed experts") mask, for every token, a ratio of the
routed experts with the highest routing probability and let the router pick its top-K among the remaining
ones; a model whose routed experts are more specialised (less redundant) suffers a larger loss increase.

The mask is a router transform registered from this directory (the library is not edited): :class:`MaskTopExperts`
(``router.masked_top_ratio``) subtracts ``1e9`` from the selection scores of each token's ``r = round(ratio * E)``
best experts, so the router's top-k picks among the others. It acts on the selection scores only; the combine
weights stay the unmasked scores of the chosen experts (renormalised if the config says so), as in the paper.
Shared experts are untouched. :func:`eval_losses` evaluates a trained model with the transform added to every
MoE layer's router: it declares no variables, so the trained parameters apply unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models import build_model
from moejax.routing import plugin


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class MaskTopExperts(plugin.Transform):
    """``masked_top_ratio``: each token's ``round(ratio * E)`` highest selection scores are never chosen."""

    name: ClassVar[str] = "mask_top_experts"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.SELECTION_SCORES})
    masked_top_ratio: float = 0.0

    def __post_init__(self) -> None:
        r = self.masked_top_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            plugin.fail("masked_top_ratio", r, "must be in [0, 1)")

    def is_identity(self) -> bool:
        return self.masked_top_ratio == 0

    def masked(self, num_experts: int) -> int:
        return int(round(self.masked_top_ratio * num_experts))

    def check_layer(self, layer: plugin.LayerFacts) -> None:
        r = self.masked(layer.num_routed)
        if r + layer.k > layer.num_routed:
            plugin.fail("masked_top_ratio", self.masked_top_ratio, f"masking {r} of {layer.num_routed} experts "
                                                                   f"leaves fewer than router.k={layer.k}")

    def on_selection_scores(self, scores: jax.Array, call: plugin.RouteCall) -> jax.Array:
        r = self.masked(scores.shape[-1])
        if r == 0:
            return scores
        _, top = jax.lax.top_k(scores, r)                                        # [T, r]
        return scores - 1e9 * jax.nn.one_hot(top, scores.shape[-1], dtype=jnp.float32).sum(-2)


def with_masking(model_config: Mapping[str, Any], ratio: float) -> dict[str, Any]:
    """``model_config`` (a mapping with an MoE spec ``moe``) with ``router.masked_top_ratio = ratio``."""
    model = dict(model_config)
    moe = dict(model["moe"])
    moe["router"] = {**dict(moe["router"]), "masked_top_ratio": ratio}
    model["moe"] = moe
    return model


def eval_losses(model_config: Mapping[str, Any], vocab_size: int, variables: dict, batches: Iterable[dict],
                max_batches: int, ratios: Sequence[float]) -> list[float]:
    """Mean next-byte cross-entropy (nats) over the first ``max_batches`` eval batches, one per masking ratio
    (0 = no masking) of the model ``model_config``; all ratios are evaluated in one compiled function."""
    models = [build_model(with_masking(model_config, ratio), vocab_size=vocab_size) for ratio in ratios]

    @jax.jit
    def sums(tokens, mask):
        m = mask.astype(jnp.float32)  # float32[B, L]: real (not padding) targets
        out = []
        for model in models:
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
