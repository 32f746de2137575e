"""Attention kinds (registered plug-ins, :mod:`.base`), rotary embeddings and the KV cache.

``mha``: multi-head attention with grouped key/value heads, biases, QK-norm, sliding windows (:mod:`.mha`);
``mla``: multi-head latent attention (:mod:`.mla`). Importing this package registers both.
"""
from moejax.models.attention.base import (ATTENTION_KINDS, AttentionCall, AttentionConfig, KVCache,
                                          attention_from_any, init_cache, register_attention)
from moejax.models.attention.mha import MHA, SelfAttention, attention_weights, causal_mask, full_call
from moejax.models.attention.mla import MLA, LatentAttention
from moejax.models.attention.rope import Rope, RopeScaling, apply_rope, rope_angles

__all__ = ["ATTENTION_KINDS", "AttentionCall", "AttentionConfig", "KVCache", "LatentAttention", "MHA", "MLA",
           "Rope", "RopeScaling", "SelfAttention", "apply_rope", "attention_from_any", "attention_weights", "causal_mask", "full_call",
           "init_cache", "register_attention", "rope_angles"]
