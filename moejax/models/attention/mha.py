"""Multi-head attention with grouped key/value heads (kind ``mha``): MHA, GQA and MQA, optional projection
biases, QK-norm and sliding windows.

Covers the attention of Mixtral (GQA, sliding window), Qwen2-MoE (query/key/value biases), Qwen3-MoE (per-head
QK-norm, a head width independent of ``D / H``) and OLMoE (QK-norm over the full projected width).

Parameters (logical axes in parentheses): ``query`` kernel float[D, H, Dh] (embed, heads, kv); ``key``, ``value``
kernels float[D, Hkv, Dh]; with ``qkv_bias`` each also a ``bias`` [H or Hkv, Dh]; ``out`` kernel float[H, Dh, D]
(heads, kv, embed); with ``qk_norm='head'`` ``q_norm`` / ``k_norm`` RMSNorm scales [Dh], with ``'full'`` [H * Dh]
and [Hkv * Dh].
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention.base import (AttentionCall, AttentionConfig, check_int, fail, masked_softmax,
                                          register_attention, write_cache)
from moejax.models.attention.rope import Rope, apply_rope

QK_NORMS = ("head", "full")


def causal_mask(length: int) -> jax.Array:
    """bool[L, L]: query position i may attend to key position j iff j <= i."""
    return jnp.tril(jnp.ones((length, length), bool))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """float32[B, H, Lq, Lk] softmax of ``q k^T / sqrt(Dh)`` for q: [B, Lq, H, Dh], k: [B, Lk, H, Dh].

    ``mask``: bool broadcastable to [B, H, Lq, Lk]; False entries get zero weight.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    return masked_softmax(scores, mask)


@register_attention
@dataclasses.dataclass(frozen=True, kw_only=True)
class MHA(AttentionConfig):
    """Multi-head attention with ``num_kv_heads`` key/value heads shared by groups of query heads.

    Attributes:
      num_kv_heads: ``Hkv``; None = the model's ``num_heads`` (plain MHA); must divide it (GQA; 1 = MQA).
      head_dim: ``Dh``; None = ``d_model / num_heads``.
      qkv_bias: biases on the query, key and value projections (Qwen2).
      out_bias: a bias on the output projection.
      qk_norm: RMSNorm of queries and keys before the rotary embedding: ``head`` (over each head's ``Dh``
        channels, Qwen3) or ``full`` (over all heads' channels of the projection, OLMoE); None for none.
      sliding_window: each query attends to itself and the ``sliding_window - 1`` tokens before it (Mistral /
        Mixtral); None for full causal attention.
    """

    KIND: ClassVar[str] = "mha"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        check_int("num_kv_heads", self.num_kv_heads, allow_none=True)
        check_int("head_dim", self.head_dim, allow_none=True)
        for name in ("qkv_bias", "out_bias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be a bool")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            fail("qk_norm", self.qk_norm, f"must be one of {list(QK_NORMS)} or None")
        check_int("sliding_window", self.sliding_window, allow_none=True)

    def kv_heads(self, num_heads: int) -> int:
        return self.num_kv_heads or num_heads

    def head_width(self, d_model: int, num_heads: int) -> int:
        return self.head_dim or d_model // num_heads

    def check(self, *, d_model: int, num_heads: int, rotary: bool, prefix: str = "") -> None:
        p = prefix
        if self.head_dim is None and d_model % num_heads:
            raise ValueError(f"{p}num_heads={num_heads}: must divide {p}d_model={d_model} (or set "
                             f"{p}attention.head_dim)")
        if num_heads % self.kv_heads(num_heads):
            raise ValueError(f"{p}attention.num_kv_heads={self.num_kv_heads}: must divide {p}num_heads={num_heads}")
        if rotary and self.head_width(d_model, num_heads) % 2:
            raise ValueError(f"{p}num_heads={num_heads}: rotary embeddings need an even head width, got "
                             f"{p}d_model / {p}num_heads = {self.head_width(d_model, num_heads)}")

    def build(self, *, d_model: int, num_heads: int, causal: bool, rope_base: float | None, norm_eps: float,
              dtype: str, param_dtype: str, name: str) -> nn.Module:
        return SelfAttention(num_heads, causal, rope_base, jnp.dtype(dtype), jnp.dtype(param_dtype), config=self,
                             norm_eps=norm_eps, name=name)

    def flops(self, *, d_model: int, num_heads: int, keys: float) -> float:
        """Projections ``[D, H*Dh]``, ``[D, Hkv*Dh]`` x2, ``[H*Dh, D]``; scores and values ``2 * H * Dh`` MACs per key."""
        dh, hkv = self.head_width(d_model, num_heads), self.kv_heads(num_heads)
        macs = d_model * num_heads * dh + 2 * d_model * hkv * dh + num_heads * dh * d_model + 2 * num_heads * dh * keys
        return 2.0 * macs

    def window(self) -> int | None:
        return self.sliding_window

    def cache_spec(self, *, batch: int, length: int, d_model: int, num_heads: int,
                   dtype: jnp.dtype) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch, length, self.kv_heads(num_heads), self.head_width(d_model, num_heads))
        return {"k": jax.ShapeDtypeStruct(shape, dtype), "v": jax.ShapeDtypeStruct(shape, dtype)}


class SelfAttention(nn.Module):
    """Multi-head self-attention over x: [B, L, D] -> [B, L, D] (kind ``mha``; see :class:`MHA`).

    ``causal``: each position attends to itself and earlier ones only. ``rope_base``: apply rotary position
    embeddings to queries and keys (a base or a :class:`~moejax.models.attention.rope.Rope` with scaling; None: no
    positional information here, e.g. ViT's learned positions). Called as ``attn(x, call, cache)`` (the attention contract, :mod:`moejax.models.attention.base`), or as
    ``attn(x)`` / ``attn(x, positions)`` for a plain full-length call, which returns y only.
    """

    num_heads: int
    causal: bool = True
    rope_base: float | Rope | None = 10000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    config: MHA = MHA()
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, call: AttentionCall | jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None) -> Any:
        cfg, h = self.config, self.num_heads
        b, length, d = x.shape
        plain = not isinstance(call, AttentionCall)
        if plain:
            call = full_call(b, length, call)
        if cfg.head_dim is None and d % h:
            raise ValueError(f"num_heads={h}: must divide the input width D={d}")
        dh, hkv = cfg.head_width(d, h), cfg.kv_heads(h)
        xc = x.astype(self.dtype)

        def proj(name: str, heads: int) -> jax.Array:
            kernel, bias = _HeadsKernel((d, heads, dh), ("embed", "heads", "kv"), 1, self.param_dtype,
                                        bias=cfg.qkv_bias, name=name)()
            y = jnp.einsum("bld,dhk->blhk", xc, kernel.astype(self.dtype))
            return y if bias is None else y + bias.astype(self.dtype)

        q, k, v = proj("query", h), proj("key", hkv), proj("value", hkv)       # [B, L, H(kv), Dh]
        if cfg.qk_norm is not None:
            q, k = self._qk_norm(q, "q_norm"), self._qk_norm(k, "k_norm")
        if self.rope_base is not None:
            q, k = apply_rope(q, call.positions, self.rope_base), apply_rope(k, call.positions, self.rope_base)
        new_cache = None
        if cache is not None:
            k, v = write_cache(cache["k"], k, call.index), write_cache(cache["v"], v, call.index)
            new_cache = {"k": k, "v": v}
        mask = call.mask(length, causal=self.causal, window=cfg.sliding_window)     # [B, 1, L, S]
        qg = q.reshape(b, length, hkv, h // hkv, dh)
        scores = jnp.einsum("blhgd,bshd->bhgls", qg.astype(jnp.float32), k.astype(jnp.float32))
        w = masked_softmax(scores / jnp.sqrt(jnp.float32(dh)), mask[:, :, None])
        out = jnp.einsum("bhgls,bshd->blhgd", w.astype(self.dtype), v.astype(self.dtype)).reshape(b, length, h, dh)
        kernel, bias = _HeadsKernel((h, dh, d), ("heads", "kv", "embed"), 2, self.param_dtype,
                                    bias=cfg.out_bias, name="out")()
        y = jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y if plain else (y, new_cache)

    def _qk_norm(self, t: jax.Array, name: str) -> jax.Array:
        """RMSNorm of t: [B, L, heads, Dh] over each head (``head``) or over all its heads' channels (``full``)."""
        norm = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)), name=name)
        if self.config.qk_norm == "head":
            return norm(t)
        return norm(t.reshape(*t.shape[:2], -1)).reshape(t.shape)


def full_call(batch: int, length: int, positions: jax.Array | None = None) -> AttentionCall:
    """The call of a full-length forward pass without a cache: every token valid, positions ``arange(L)`` (or the
    given int[L] / int[B, L])."""
    pos = jnp.arange(length) if positions is None else positions
    pos = jnp.broadcast_to(pos, (batch, length))
    return AttentionCall(positions=pos, key_valid=jnp.ones((batch, length), bool), index=jnp.zeros((), jnp.int32))


class _HeadsKernel(nn.Module):
    """A projection kernel declared at its true rank (``kernel``, e.g. float[D, H, Dh]) with logical axes, and
    optionally a ``bias`` over its output axes.

    ``nn.DenseGeneral`` would initialise a flattened 2-D kernel through the boxed initializer, whose sharding
    constraint then fails under a mesh (rank 2 vs 3 names). Same distribution: fan-in over the first
    ``fan_in_axes`` axes, truncated normal, variance 1 / fan_in. Returns ``(kernel, bias or None)``.
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    fan_in_axes: int
    param_dtype: jnp.dtype = jnp.float32
    bias: bool = False

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        n = len(self.shape)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(self.fan_in_axes)),
                                                out_axis=tuple(range(self.fan_in_axes, n)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), self.shape, self.param_dtype)
        if not self.bias:
            return kernel, None
        out = self.shape[self.fan_in_axes:]
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               self.names[self.fan_in_axes:]), out, self.param_dtype)
        return kernel, bias


heads_kernel = _HeadsKernel
