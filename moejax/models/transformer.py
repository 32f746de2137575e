"""Decoder-only Transformer language model with rotary positions and MoE FFNs every ``moe_every`` blocks."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.context import LayerContext
from moejax.models.attention import KVCache, init_cache
from moejax.models.blocks import Encoder, constrain
from moejax.models.config import LMConfig
from moejax.routing.types import RoutingStats


class TransformerLM(nn.Module):
    """``logits, stats = TransformerLM(cfg).apply(variables, tokens, deterministic=...)``.

    tokens: int32[B, L] -> logits float32[B, L, V] (position ``t`` predicts token ``t + 1``; causal), and a
    tuple with one :class:`~moejax.routing.RoutingStats` per block (``RoutingStats.dense()`` for dense
    FFNs). Every MoE FFN routes all ``B * L`` tokens of the batch together.

    Parameters (logical axes): ``embed/embedding`` [V, D] (vocab, embed); ``block_{i}/attn/...`` (see
    :class:`~moejax.models.attention.SelfAttention`); ``block_{i}/ffn/...`` (MoE or dense layer);
    norms' ``scale``/``bias`` [D] (embed); untied ``head/kernel`` [D, V] (embed, vocab).

    Causality: attention is causal, and with dropless dispatch (or ``capacity_factor=None``) a token's
    routing depends on that token alone, so logits at ``t`` depend on tokens ``<= t`` only. With a finite
    capacity, tokens of the whole batch compete for expert slots, and with expert-choice routing experts pick
    among all tokens: a later token can then change whether an earlier one is dropped or taken (the usual
    leakage of batch-level routing; use it for training, not for autoregressive decoding).

    Token ids: ``tokens`` are also handed to every sparse and chain MoE FFN as ``token_ids`` (sharded like the
    batch), so that a hash router (``router.kind='hash'``, Roller et al. 2021's Hash Layers) sends every
    occurrence of a vocabulary entry to the same expert(s), at any position and in any sequence; routers of
    the other kinds ignore them.

    ``deterministic=False`` (training): dropout (RNG ``'dropout'``), router jitter (RNG ``'jitter'``) and the
    training capacity factor.

    Decoding: with ``cache`` (a :class:`~moejax.models.attention.KVCache`, :func:`make_cache`) the call writes the
    L new tokens at the cache's slots ``[index, index + L)``, attends to every valid earlier slot, and returns
    ``(logits, stats, new_cache)``; ``positions`` then gives each new token's rotary position (int[B, L]; with
    left-padded prompts ``slot - padding``). ``token_mask`` bool[B, L] (with or without a cache): False marks
    padding tokens, which no query attends to. Use dropless dispatch (or ``capacity_factor=None``) when decoding,
    so that a token's output does not depend on which other tokens are in the call.

    ``moe_k`` (static, optional): experts per token of every routed MoE FFN (``layer='sparse'`` or ``'chain'``),
    clipped to each layer's number of router outputs (:class:`~moejax.layers.MoELayer` clips ``ctx.k``); None keeps each
    layer's ``router.k`` (SMoE-Dropout's inference-time k; ``ValueError`` naming ``moe_k`` unless None or >= 1).
    """

    config: LMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, positions: jax.Array | None = None,
                 moe_k: int | None = None, token_mask: jax.Array | None = None, cache: KVCache | None = None):
        """tokens: int[B, L]; positions: int[L] or int[B, L] for the rotary embeddings (default arange(L)).

        Returns ``(logits, stats)``, or ``(logits, stats, new_cache)`` when ``cache`` is given."""
        cfg = self.config
        ctx = LayerContext(token_ids=tokens, deterministic=deterministic, k=moe_k)   # checks moe_k first
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int[B, L], got shape {tokens.shape}")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0), ("vocab", "embed")),
                         name="embed")
        x = constrain(embed(tokens))                                   # [B, L, D]
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x, stats, new_cache = Encoder(cfg, causal=True, rope_base=cfg.rope, name="decoder")(
            x, ctx, positions, token_mask=token_mask, cache=cache)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype), name="head",
                              kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                       ("embed", "vocab")))(x)
        if cache is not None:
            return logits.astype(jnp.float32), stats, new_cache
        return logits.astype(jnp.float32), stats


def make_cache(cfg: LMConfig, batch: int, length: int, dtype: str | None = None) -> KVCache:
    """An empty KV cache of ``length`` slots for ``batch`` sequences of the LM ``cfg`` (each block's attention kind
    says what it caches); ``dtype`` defaults to the model's computation dtype."""
    dt = jnp.dtype(dtype or cfg.dtype)
    spec = cfg.attention.cache_spec(batch=batch, length=length, d_model=cfg.d_model, num_heads=cfg.num_heads, dtype=dt)
    return init_cache((spec,) * cfg.num_layers, batch, length)
