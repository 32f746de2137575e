"""Building blocks shared by the models: norms, FFN layers from specs, the pre-norm Transformer stack.

Shapes: ``B`` batch, ``L`` length, ``D`` width. Activations between blocks are constrained to the logical
axes (batch, length, embed); without a mesh and rules this is a no-op.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.context import LayerContext
from moejax.layers import DenseLayer, make_layer
from moejax.models.attention import AttentionCall, KVCache, full_call
from moejax.models.attention.rope import Rope
from moejax.models.config import FFNSpec, TransformerConfig
from moejax.context import LayerOutput
from moejax.routing.types import RoutingStats

_ONES = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
_ZEROS = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))


def make_norm(kind: str | None, dtype: str, param_dtype: str, name: str, eps: float = 1e-6) -> nn.Module | None:
    """A LayerNorm or RMSNorm over the last axis with ``scale`` (and ``bias``) on axis (embed,); None for None."""
    if kind is None:
        return None
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=eps, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                            scale_init=_ONES, bias_init=_ZEROS, name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                          scale_init=_ONES, name=name)
    raise ValueError(f"norm={kind!r}: must be 'layernorm', 'rmsnorm' or None")


def make_ffn(spec: FFNSpec, *, kind: str, activation: str, use_bias: bool, dtype: str, param_dtype: str,
             name: str) -> nn.Module:
    """For an ``MoEConfig`` the layer ``spec.layer`` selects (``MoELayer``, ``SoftMoELayer``, ``SMEARLayer``,
    ``ChainOfExpertsLayer``; :func:`moejax.layers.make_layer`), else ``DenseLayer(spec, kind, ...)``; every one is
    called as ``layer(x, ctx)`` and returns a :class:`~moejax.layers.LayerOutput`."""
    if isinstance(spec, MoEConfig):
        return make_layer(spec, name=name)
    return DenseLayer(spec, kind, activation, use_bias, dtype, param_dtype, name=name)


def dense_init(out_names: tuple[str | None, ...], in_names: tuple[str | None, ...] = ("embed",),
               init: nn.initializers.Initializer = nn.initializers.lecun_normal()):
    """A kernel initializer of a [in, out] Dense kernel carrying logical axis names ``in_names + out_names``."""
    return nn.with_logical_partitioning(init, (*in_names, *out_names))


def constrain(x: jax.Array) -> jax.Array:
    """x: [B, L, D] annotated with logical axes (batch, length, embed)."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; x: [B, L, D] -> (x', ffn's LayerOutput,
    the attention's new cache entries or None).

    The FFN routes all ``B * L`` tokens together. Dropout (rate ``config.dropout_rate``) on both branch
    outputs when not ``ctx.deterministic``. ``ctx`` is the FFN's :class:`~moejax.layers.LayerContext` (token ids,
    the previous routed layer's logits, the model-level ``k``); the returned output carries the logits on.
    ``call`` and ``cache`` are the attention's (:mod:`moejax.models.attention.base`); the attention module is the
    one ``config.attention`` builds.
    """

    config: TransformerConfig
    ffn: FFNSpec
    causal: bool
    rope_base: float | Rope | None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext, call: AttentionCall,
                 cache: dict[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, LayerOutput, dict[str, jax.Array] | None]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=ctx.deterministic)
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "attn_norm", cfg.norm_eps)(x)
        attn = cfg.attention.build(d_model=cfg.d_model, num_heads=cfg.num_heads, causal=self.causal,
                                   rope_base=self.rope_base, norm_eps=cfg.norm_eps, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, name="attn")
        h, cache = attn(h, call, cache)
        x = constrain(x + drop(h))
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "ffn_norm", cfg.norm_eps)(x)
        ffn = make_ffn(self.ffn, kind=cfg.ffn_kind, activation=cfg.activation, use_bias=cfg.use_bias,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ffn")
        out = ffn(h, ctx)
        return constrain(x + drop(out.y)), out, cache


class Encoder(nn.Module):
    """``config.num_layers`` blocks (FFN of block ``i`` = ``config.ffn_specs()[i]``) and a final norm.

    x: [B, L, D] -> (float[B, L, D], tuple of one RoutingStats per block, the updated :class:`KVCache` or None).
    Blocks are named ``block_{i}``. ``ctx`` (created once by the model): its ``token_ids`` int[B, L] (optional; the
    LM passes its input tokens, sharded like the activations' (batch, length) axes; without them, e.g. ViT, a hash
    router hashes each token's index among the ``B * L`` routed) and ``k`` reach every FFN; the MoE++
    gating-residual logits flow from block to block through ``ctx.router_logits``.

    ``positions``: int[L] or int[B, L] rotary positions (default ``arange(L)``). ``token_mask``: bool[B, L], False
    for padding tokens, which no query attends to. ``cache``: a :class:`KVCache`; the L tokens are written at its
    slots ``[index, index + L)`` and attend to every valid slot up to their own.
    """

    config: TransformerConfig
    causal: bool
    rope_base: float | Rope | None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext, positions: jax.Array | None = None, *,
                 token_mask: jax.Array | None = None, cache: KVCache | None = None
                 ) -> tuple[jax.Array, tuple[RoutingStats, ...], KVCache | None]:
        cfg = self.config
        b, length = x.shape[:2]
        if ctx.token_ids is not None:
            if tuple(ctx.token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"token_ids: expected int[B, L] = {tuple(x.shape[:-1])} (x's leading axes), "
                                 f"got shape {tuple(ctx.token_ids.shape)}")
            ctx = ctx.replace(token_ids=nn.with_logical_constraint(ctx.token_ids, ("batch", "length")))
        call = attention_call(b, length, positions, token_mask, cache)
        stats, layers = [], []
        specs = cfg.ffn_specs()
        if cache is not None and len(cache.layers) != len(specs):
            raise ValueError(f"cache: holds {len(cache.layers)} layers, the model has {len(specs)} blocks")
        for i, spec in enumerate(specs):
            layer_cache = None if cache is None else cache.layers[i]
            x, out, layer_cache = Block(cfg, spec, self.causal, self.rope_base, name=f"block_{i}")(
                x, ctx, call, layer_cache)
            ctx = ctx.replace(router_logits=out.logits)
            stats.append(out.stats)
            layers.append(layer_cache)
        if cache is not None:
            cache = cache.replace(layers=tuple(layers), index=cache.index + length, valid=call.key_valid)
        return make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "final_norm", cfg.norm_eps)(x), tuple(stats), cache


def attention_call(batch: int, length: int, positions: jax.Array | None, token_mask: jax.Array | None,
                   cache: KVCache | None) -> AttentionCall:
    """The attention inputs of one model call: rotary positions, the valid key slots (the cache's, with the new
    tokens' slots set from ``token_mask``) and the first new slot."""
    call = full_call(batch, length, positions)
    mask = jnp.ones((batch, length), bool) if token_mask is None else token_mask.astype(bool)
    if token_mask is not None and tuple(token_mask.shape) != (batch, length):
        raise ValueError(f"token_mask: expected bool[B, L] = {(batch, length)}, got shape {tuple(token_mask.shape)}")
    if cache is None:
        return call.replace(key_valid=mask)
    if cache.valid.shape[0] != batch:
        raise ValueError(f"cache: built for batch {cache.valid.shape[0]}, called with batch {batch}")
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    return call.replace(key_valid=valid, index=cache.index)
