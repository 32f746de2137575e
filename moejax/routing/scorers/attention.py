"""The attention router of Yuan 2.0-M32 (Wu et al. 2024, "Yuan 2.0-M32: Mixture of Experts with Attention
Router", arXiv:2405.17976).

A linear router scores each expert independently (``logits = x W``). The attention router lets the experts'
scores interact: three projections of the token give one query, key and value *scalar per expert*,
``q = x W_q``, ``k = x W_k``, ``v = x W_v`` (each float32[E]); the E x E matrix ``A = softmax_row(q k^T)``
(row ``i`` of ``A`` is expert ``i``'s attention over the experts, without a ``1/sqrt(d)`` scale, since the
"head width" is 1) mixes the values, and the router logits are ``A v``. This is the form of the authors'
released code (one fused ``[D, 3E]`` projection without bias, float32 softmax, no output projection after
``A v``): the paper's figure shows exactly these three steps; there is no further projection to logits.
The logits then go through the configured routing function (top-k and softmax in the paper).

Registered as ``router.scorer='attention'``. It does not offer ``expert_slices``: every expert's logit mixes all
experts' values, so expert surgery cannot remove or merge its experts by slicing.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from moejax.routing.scorer import ParamSpec, Scorer, register_scorer


def attention_router_logits(x: jax.Array, w_q: jax.Array, w_k: jax.Array, w_v: jax.Array) -> jax.Array:
    """float32[T, E] logits ``softmax(q k^T) v`` per token.

    Args:
      x: float[T, D] tokens; w_q, w_k, w_v: float[D, E] the query, key and value projections.
    """
    x = x.astype(jnp.float32)
    q, k, v = (x @ w.astype(jnp.float32) for w in (w_q, w_k, w_v))       # [T, E] each
    attn = jax.nn.softmax(q[:, :, None] * k[:, None, :], axis=-1)          # [T, E, E]
    return jnp.einsum("tij,tj->ti", attn, v)


@register_scorer
@dataclasses.dataclass(frozen=True)
class Attention(Scorer):
    """``attention``: Yuan 2.0-M32's attention router. Parameters ``kernel`` (the query projection, so code that reads
    the router kernel keeps working), ``key_kernel`` and ``value_kernel``, each float32[D, E] (embed, expert)."""

    name: ClassVar[str] = "attention"

    def params(self, d_model: int, num_experts: int) -> dict[str, ParamSpec]:
        spec = ParamSpec((d_model, num_experts), ("embed", "expert"))
        return {"kernel": spec, "key_kernel": spec, "value_kernel": spec}

    def logits(self, x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
        return attention_router_logits(x, params["kernel"], params["key_kernel"], params["value_kernel"])

    def flops_per_token(self, d_model: int, num_experts: int) -> float:
        # The three projections, then per token the E x E scores (1 E^2), their softmax (4 E^2: max, subtract,
        # exp, normalise) and the mixing of the values (2 E^2): within 0.5% of XLA's count (tests/test_flops.py).
        e = num_experts
        return 3 * 2.0 * d_model * e + 7.0 * e * e
