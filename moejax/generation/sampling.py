"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Shapes: ``B`` sequences, ``V`` vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
      temperature: 0 = greedy (argmax; the other fields are then ignored); otherwise logits are divided by it.
      top_k: keep the ``top_k`` most likely tokens (None or 0: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1.0: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"sampling.temperature={t!r}: must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"sampling.top_k={self.top_k!r}: must be None or an integer >= 0")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"sampling.top_p={p!r}: must be a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float) -> jax.Array:
    """float32[B, V] logits with the tokens outside the top-k and the top-p nucleus set to -inf.

    Top-p keeps a token when the probability mass of the strictly more likely tokens is below ``top_p`` (so the
    most likely token always stays, and ties at the boundary are kept together only as far as the sort takes them).
    """
    logits = logits.astype(jnp.float32)
    neg = jnp.float32(-jnp.inf)
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def next_token(logits: jax.Array, rng: jax.Array | None, sampling: Sampling) -> jax.Array:
    """int32[B] next tokens from float[B, V] logits (``rng`` is unused when greedy)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
