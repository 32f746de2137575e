"""Rotary position embeddings (RoFormer), in the two channel layouts pretrained models use.

Shapes: ``B`` batch, ``L`` length, ``H`` heads, ``Dh`` rotated width (even).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, base: float = 10000.0) -> jax.Array:
    """float32[..., Dh/2] rotation angles ``pos * base^(-2i / Dh)`` for int positions [...]."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: rotary embeddings need an even head width")
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def deinterleave(x: jax.Array) -> jax.Array:
    """x[..., Dh] with channels ``(x_0, x_1, x_2, ...)`` -> ``(x_0, x_2, ..., x_1, x_3, ...)``.

    Turns adjacent-pair rotary layout (GPT-J, DeepSeek's ``rope_interleave``) into the half-split layout of
    :func:`apply_rope`; applied to queries and keys alike it leaves every dot product unchanged.
    """
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0, *, interleaved: bool = False) -> jax.Array:
    """Rotates x: [B, L, H, Dh] by position (GPT-NeoX half-split pairs ``(x_i, x_{i + Dh/2})``).

    ``positions``: int[L] or int[B, L]. Each pair is rotated by the angle ``pos * base^(-2i / Dh)``, so
    ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only, and norms are preserved. ``interleaved``: the
    pairs are adjacent channels ``(x_{2i}, x_{2i+1})``; the result is returned in the half-split layout (as
    Hugging Face's DeepSeek-V3 does), which queries and keys share. Computed in float32, returned in x's dtype.
    """
    if interleaved:
        x = deinterleave(x)
    angles = rope_angles(positions, x.shape[-1], base)            # [(B,) L, Dh/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]   # [B, L, 1, Dh/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
