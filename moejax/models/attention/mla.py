"""Multi-head latent attention (kind ``mla``; DeepSeek-V2/V3): keys and values are up-projected from one
low-rank latent per token, and that latent (plus a small shared rotary key) is all the KV cache holds.

Per token ``x`` [D]: queries ``q = W_qb norm(W_qa x)`` (or ``W_q x`` without ``q_lora_rank``), split per head into
a non-rotary part [Dn] and a rotary part [Dr]; the latent ``c = norm(W_kva x)[:R]`` [R] and a rotary key
``k_r = rope(W_kva x[R:])`` [Dr] shared by all heads; per head ``k = (W_kb c, k_r)``, ``v = W_vb c`` [Dv].
Scores ``q . k / sqrt(Dn + Dr)``.

Parameters (logical axes): ``q_a`` kernel [D, Rq] (embed, lora), ``q_norm`` scale [Rq], ``q_b`` kernel
[Rq, H, Dn + Dr] (lora, heads, kv), or ``query`` kernel [D, H, Dn + Dr] without ``q_lora_rank``; ``kv_a`` kernel
[D, R + Dr] (embed, lora), ``kv_norm`` scale [R], ``kv_b`` kernel [R, H, Dn + Dv] (lora, heads, kv); ``out``
kernel [H, Dv, D] (heads, kv, embed). Cache per layer: ``latent`` [B, S, R] and ``k_rope`` [B, S, Dr].
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention.base import (AttentionCall, AttentionConfig, check_int, fail, masked_softmax,
                                          register_attention, write_cache)
from moejax.models.attention.mha import heads_kernel
from moejax.models.attention.rope import Rope, apply_rope


@register_attention
@dataclasses.dataclass(frozen=True, kw_only=True)
class MLA(AttentionConfig):
    """Multi-head latent attention.

    Attributes:
      q_lora_rank: ``Rq``, rank of the query down-projection; None projects queries directly (DeepSeek-V2-Lite).
      kv_lora_rank: ``R``, width of the cached latent.
      qk_nope_head_dim: ``Dn``, per-head query/key channels without rotary embedding.
      qk_rope_head_dim: ``Dr``, per-head query channels (and the shared key channels) with rotary embedding.
      v_head_dim: ``Dv``, per-head value width.
      rope_interleave: the rotary pairs are adjacent channels (DeepSeek's checkpoints); False: half-split pairs.
      latent_norm_eps: epsilon of the query and key/value latent RMSNorms; None = the model's ``norm_eps``
        (Hugging Face's DeepSeek-V3 fixes them at 1e-6 whatever its ``rms_norm_eps``).
    """

    KIND: ClassVar[str] = "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    latent_norm_eps: float | None = None

    def __post_init__(self) -> None:
        check_int("q_lora_rank", self.q_lora_rank, allow_none=True)
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_int(name, getattr(self, name))
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "rotary embeddings need an even width")
        if not isinstance(self.rope_interleave, bool):
            fail("rope_interleave", self.rope_interleave, "must be a bool")
        eps = self.latent_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            fail("latent_norm_eps", eps, "must be None or a number in (0, 1)")

    def check(self, *, d_model: int, num_heads: int, rotary: bool, prefix: str = "") -> None:
        if not rotary:
            raise ValueError(f"{prefix}attention.kind='mla': multi-head latent attention needs rotary positions")

    def build(self, *, d_model: int, num_heads: int, causal: bool, rope_base: float | None, norm_eps: float,
              dtype: str, param_dtype: str, name: str) -> nn.Module:
        return LatentAttention(self, num_heads, causal, rope_base, norm_eps, jnp.dtype(dtype),
                               jnp.dtype(param_dtype), name=name)

    def flops(self, *, d_model: int, num_heads: int, keys: float) -> float:
        """Query (low-rank or direct), ``kv_a``, ``kv_b`` (each token's latent up-projected once) and output
        projections; per attended key ``H * (Dn + Dr)`` MACs for the score and ``H * Dv`` for the value."""
        h, dn, dr, dv, r = num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank
        q = d_model * h * (dn + dr) if self.q_lora_rank is None else \
            d_model * self.q_lora_rank + self.q_lora_rank * h * (dn + dr)
        macs = q + d_model * (r + dr) + r * h * (dn + dv) + h * dv * d_model + keys * h * (dn + dr + dv)
        return 2.0 * macs

    def cache_spec(self, *, batch: int, length: int, d_model: int, num_heads: int,
                   dtype: jnp.dtype) -> dict[str, jax.ShapeDtypeStruct]:
        return {"latent": jax.ShapeDtypeStruct((batch, length, self.kv_lora_rank), dtype),
                "k_rope": jax.ShapeDtypeStruct((batch, length, self.qk_rope_head_dim), dtype)}


class LatentAttention(nn.Module):
    """x: [B, L, D] -> (y [B, L, D], new cache or None); see :class:`MLA` and the attention contract."""

    config: MLA
    num_heads: int
    causal: bool
    rope_base: float | Rope
    norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _dense(self, x: jax.Array, shape: tuple[int, ...], names: tuple[str, ...], name: str) -> jax.Array:
        kernel, _ = heads_kernel(shape, names, 1, self.param_dtype, name=name)()
        return jnp.einsum("bld,d...->bl...", x.astype(self.dtype), kernel.astype(self.dtype))

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        eps = self.norm_eps if self.config.latent_norm_eps is None else self.config.latent_norm_eps
        return nn.RMSNorm(epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("lora",)),
                          name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, call: AttentionCall, cache: dict[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg, h = self.config, self.num_heads
        b, length, d = x.shape
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = self._dense(x, (d, h, dn + dr), ("embed", "heads", "kv"), "query")
        else:
            q = self._dense(x, (d, cfg.q_lora_rank), ("embed", "lora"), "q_a")
            q = self._dense(self._norm(q, "q_norm"), (cfg.q_lora_rank, h, dn + dr), ("lora", "heads", "kv"), "q_b")
        q_nope, q_rope = q[..., :dn], q[..., dn:]                                     # [B, L, H, Dn|Dr]
        kv = self._dense(x, (d, r + dr), ("embed", "lora"), "kv_a")                    # [B, L, R + Dr]
        latent = self._norm(kv[..., :r], "kv_norm")                                    # [B, L, R]
        rope = dict(base=self.rope_base, interleaved=cfg.rope_interleave)
        q_rope = apply_rope(q_rope, call.positions, **rope)
        k_rope = apply_rope(kv[..., None, r:], call.positions, **rope)[:, :, 0]       # [B, L, Dr]
        new_cache = None
        if cache is not None:
            latent = write_cache(cache["latent"], latent, call.index)                  # [B, S, R]
            k_rope = write_cache(cache["k_rope"], k_rope, call.index)                  # [B, S, Dr]
            new_cache = {"latent": latent, "k_rope": k_rope}
        kvb = self._dense(latent, (r, h, dn + dv), ("lora", "heads", "kv"), "kv_b")  # [B, S, H, Dn + Dv]
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        f32 = jnp.float32
        scores = (jnp.einsum("blhd,bshd->bhls", q_nope.astype(f32), k_nope.astype(f32))
                  + jnp.einsum("blhd,bsd->bhls", q_rope.astype(f32), k_rope.astype(f32)))
        scale = (dn + dr) ** -0.5 * (self.rope_base.softmax_factor if isinstance(self.rope_base, Rope) else 1.0)
        w = masked_softmax(scores * f32(scale), call.mask(length, causal=self.causal))
        out = jnp.einsum("bhls,bshd->blhd", w.astype(self.dtype), v.astype(self.dtype))   # [B, L, H, Dv]
        kernel, _ = heads_kernel((h, dv, d), ("heads", "kv", "embed"), 2, self.param_dtype, name="out")()
        return jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype)), new_cache
