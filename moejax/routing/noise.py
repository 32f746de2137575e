"""Routing noise for training: Gumbel selection noise and expert (gate) dropout.

Both are applied by :class:`moejax.routing.Router` only when ``deterministic=False``, drawing from the
``'jitter'`` RNG stream (the one the trainer already provides, next to Switch's input jitter).
In evaluation they are off, so a router with noise is plain routing there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing.types import Routing


def gumbel_noise(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    """float32[T, E] ``scale * Gumbel(0, 1)`` noise for the router logits.

    Adding standard Gumbel noise to the logits and taking the top k samples k experts without
    replacement from ``softmax(logits)`` (the Gumbel-top-k trick, Kool et al. 2019), so exploration
    follows the router's own distribution; ``scale`` is a temperature (``scale -> 0`` recovers
    deterministic top-k). The routers add it to the logits for *selection* only; weights stay the
    noise-free probabilities so the combine weights remain a smooth function of the router.
    """
    return scale * jax.random.gumbel(key, shape, jnp.float32)


def drop_gates(routing: Routing, key: jax.Array, rate: float) -> Routing:
    """Expert dropout on the gate: each valid (token, expert) slot is dropped with probability ``rate``.

    SiRA (Zhu et al. 2023, "SiRA: Sparse Mixture of Low Rank Adaptation", arXiv:2311.09179) applies
    dropout to the gating output in training so that tokens do not rely on a single expert. We drop a
    slot by marking it invalid (the expert is then not computed for that token, which dispatch honours)
    and scale the kept weights by ``1 / (1 - rate)`` (inverted dropout, so the expected combine weight
    is unchanged; our choice, the paper's text does not settle it). A token may lose all its experts.
    The losses and statistics, computed downstream from the routing, see the kept slots.

    Args:
      routing: a token-choice routing with [T, K] slots; key: PRNG key; rate: ``0 <= rate < 1``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"router.gate_dropout={rate}: must be in [0, 1)")
    keep = jax.random.bernoulli(key, 1.0 - rate, routing.valid.shape)
    valid = routing.valid & keep
    weight = jnp.where(valid, routing.weight / (1.0 - rate), 0.0)
    return routing.replace(valid=valid, weight=weight)
