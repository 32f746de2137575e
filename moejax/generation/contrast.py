"""Self-contrast decoding of an MoE LM (SCMoE; Shi et al. 2024, *Unchosen Experts Can Contribute Too: Unleashing MoE
Models' Power by Self-Contrast*, arXiv:2405.14507).

The same model is run twice per step: with its normal ("strong") expert activation and with a weaker one; the next
token is chosen from ``(1 + beta) log p_strong - beta log p_weak`` over the tokens the strong activation finds
plausible (probability at least ``alpha`` times its most likely token's; every other token gets -inf), which
rewards what the strong activation adds over the weak one. The weak activation here is the model-level expert
count override (``moe_k=weak_k`` of every routed layer, e.g. top-1 instead of top-2). The paper also studies weak
activations that route to lower-ranked experts (rank-k routing); that needs a router that selects by rank, which
moejax does not have yet.

Shapes: ``B`` sequences, ``L`` tokens, ``V`` vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfContrast:
    """weak_k: experts per token of the weak activation; beta: contrast strength (0: plain decoding of the strong
    activation); alpha: plausibility threshold relative to the strong activation's most likely token."""

    weak_k: int = 1
    beta: float = 0.5
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.weak_k, bool) or not isinstance(self.weak_k, int) or self.weak_k < 1:
            raise ValueError(f"contrast.weak_k={self.weak_k!r}: must be an integer >= 1")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"contrast.beta={self.beta!r}: must be a finite number >= 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"contrast.alpha={self.alpha!r}: must be a number in (0, 1]")

    def combine(self, strong: jax.Array, weak: jax.Array) -> jax.Array:
        """float32[..., V] contrast scores from the strong and weak activations' logits float[..., V]."""
        logp_s = jax.nn.log_softmax(strong.astype(jnp.float32), axis=-1)
        logp_w = jax.nn.log_softmax(weak.astype(jnp.float32), axis=-1)
        plausible = logp_s >= jnp.max(logp_s, axis=-1, keepdims=True) + math.log(self.alpha)
        return jnp.where(plausible, (1 + self.beta) * logp_s - self.beta * logp_w, -jnp.inf)
