"""The linear router: ``logits = x W`` (Switch, GShard, Mixtral, Qwen, DeepSeek, OLMoE)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from moejax.routing.scorer import EXPERT_SLICES, ParamSpec, Scorer, register_scorer


@register_scorer
@dataclasses.dataclass(frozen=True)
class Linear(Scorer):
    """``linear``: one column per expert. Parameter ``kernel`` float32[D, E] (embed, expert)."""

    name: ClassVar[str] = "linear"
    offers: ClassVar[frozenset[str]] = frozenset({EXPERT_SLICES})

    def params(self, d_model: int, num_experts: int) -> dict[str, ParamSpec]:
        return {"kernel": ParamSpec((d_model, num_experts), ("embed", "expert"))}

    def logits(self, x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
        return x @ params["kernel"].astype(jnp.float32)

    def flops_per_token(self, d_model: int, num_experts: int) -> float:
        return 2.0 * d_model * num_experts
