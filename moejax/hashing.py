"""Integer hashing shared by hash routing (``moejax.routing.fixed``) and checkpoint checksums."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser on uint32: a bijection with full avalanche, so that nearby inputs (consecutive
    ids, one flipped bit) map to unrelated outputs."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)
