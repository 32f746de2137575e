"""A scorer registered from outside the library: cosine routing (X-MoE, Chi et al. 2022, arXiv:2204.09179).

This file is the whole mechanism: ``tests/test_plugin_scorer.py`` imports it and selects it by name from a config
(``router.scorer='cosine'``, ``router.cosine_dim=8``), without editing ``moejax/``. The token is projected to a
small routing space, and each expert's logit is the cosine of that projection with the expert's own learned
embedding, over a temperature.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from moejax.routing.scorer import EXPERT_SLICES, ParamSpec, Scorer, register_scorer


@register_scorer
@dataclasses.dataclass(frozen=True)
class Cosine(Scorer):
    """``cosine``: ``logits[t, e] = cos(x_t W, emb_e) / cosine_temperature``.

    Parameters: ``projection`` float32[D, R] (embed, None), shared by all experts; ``expert_embedding``
    float32[E, R] (expert, None), one row per expert (so experts can be pruned or merged by slicing rows).
    """

    name: ClassVar[str] = "cosine"
    offers: ClassVar[frozenset[str]] = frozenset({EXPERT_SLICES})
    cosine_dim: int = 16
    cosine_temperature: float = 0.07

    def __post_init__(self) -> None:
        if isinstance(self.cosine_dim, bool) or not isinstance(self.cosine_dim, int) or self.cosine_dim < 1:
            raise ValueError(f"router.cosine_dim={self.cosine_dim!r}: must be an integer >= 1")
        t = self.cosine_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"router.cosine_temperature={t!r}: must be a finite number > 0")

    def params(self, d_model: int, num_experts: int) -> dict[str, ParamSpec]:
        return {"projection": ParamSpec((d_model, self.cosine_dim), ("embed", None)),
                "expert_embedding": ParamSpec((num_experts, self.cosine_dim), ("expert", None),
                                              jax.nn.initializers.normal(1.0))}

    def logits(self, x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
        h = x @ params["projection"].astype(jnp.float32)                       # [T, R]
        emb = params["expert_embedding"].astype(jnp.float32)                   # [E, R]
        h = h * jax.lax.rsqrt(jnp.sum(h * h, -1, keepdims=True) + 1e-12)
        emb = emb * jax.lax.rsqrt(jnp.sum(emb * emb, -1, keepdims=True) + 1e-12)
        return (h @ emb.T) / self.cosine_temperature

    def flops_per_token(self, d_model: int, num_experts: int) -> float:
        r = self.cosine_dim
        # projection, the token's normalisation (square, sum, scale), the cosines, the temperature.
        return 2.0 * d_model * r + 3.0 * r + 2.0 * r * num_experts + num_experts
