"""Rotary position embeddings and multi-head self-attention (causal or not).

Shapes: ``B`` batch, ``L`` length, ``D`` width, ``H`` heads, ``Dh = D / H`` head width.
Parameters (logical axes in parentheses): ``query``, ``key``, ``value`` kernels float[D, H, Dh]
(embed, heads, kv); ``out`` kernel float[H, Dh, D] (heads, kv, embed). No biases.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, base: float = 10000.0) -> jax.Array:
    """float32[..., Dh/2] rotation angles ``pos * base^(-2i / Dh)`` for int positions [...]."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: rotary embeddings need an even head width")
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates x: [B, L, H, Dh] by position (GPT-NeoX half-split pairs ``(x_i, x_{i + Dh/2})``).

    ``positions``: int[L] or int[B, L]. Each pair is rotated by the angle ``pos * base^(-2i / Dh)``, so
    ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only, and norms are preserved. Computed in float32,
    returned in x's dtype.
    """
    angles = rope_angles(positions, x.shape[-1], base)            # [(B,) L, Dh/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]   # [B, L, 1, Dh/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_mask(length: int) -> jax.Array:
    """bool[L, L]: query position i may attend to key position j iff j <= i."""
    return jnp.tril(jnp.ones((length, length), bool))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """float32[B, H, Lq, Lk] softmax of ``q k^T / sqrt(Dh)`` for q: [B, Lq, H, Dh], k: [B, Lk, H, Dh].

    ``mask``: bool broadcastable to [B, H, Lq, Lk]; False entries get zero weight.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over x: [B, L, D] -> [B, L, D].

    ``causal``: each position attends to itself and earlier ones only. ``rope_base``: apply rotary position
    embeddings to queries and keys (None: no positional information here, e.g. ViT's learned positions).
    """

    num_heads: int
    causal: bool = True
    rope_base: float | None = 10000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; positions: int[L] or int[B, L] (default ``arange(L)``) for the rotary embeddings."""
        b, length, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads}: must divide the input width D={d}")
        dh = d // self.num_heads

        def proj(name: str) -> jax.Array:
            kernel = _HeadsKernel((d, self.num_heads, dh), ("embed", "heads", "kv"), 1, self.param_dtype, name=name)()
            return jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))

        q, k, v = proj("query"), proj("key"), proj("value")          # [B, L, H, Dh]
        if self.rope_base is not None:
            pos = jnp.arange(length) if positions is None else positions
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        mask = causal_mask(length)[None, None] if self.causal else None
        w = attention_weights(q, k, mask)                              # [B, H, L, L]
        out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(self.dtype), v)
        kernel = _HeadsKernel((self.num_heads, dh, d), ("heads", "kv", "embed"), 2, self.param_dtype, name="out")()
        return jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))


class _HeadsKernel(nn.Module):
    """A projection kernel declared at its true rank (``kernel``, e.g. float[D, H, Dh]) with logical axes.

    ``nn.DenseGeneral`` would initialise a flattened 2-D kernel through the boxed initializer, whose sharding
    constraint then fails under a mesh (rank 2 vs 3 names). Same distribution: fan-in over the first
    ``fan_in_axes`` axes, truncated normal, variance 1 / fan_in.
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    fan_in_axes: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        n = len(self.shape)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(self.fan_in_axes)),
                                                out_axis=tuple(range(self.fan_in_axes, n)))
        return self.param("kernel", nn.with_logical_partitioning(init, self.names), self.shape, self.param_dtype)
