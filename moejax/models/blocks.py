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
from moejax.models.attention import SelfAttention
from moejax.models.config import FFNSpec, TransformerConfig
from moejax.context import LayerOutput
from moejax.routing.types import RoutingStats

_ONES = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
_ZEROS = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))


def make_norm(kind: str | None, dtype: str, param_dtype: str, name: str) -> nn.Module | None:
    """A LayerNorm or RMSNorm over the last axis with ``scale`` (and ``bias``) on axis (embed,); None for None."""
    if kind is None:
        return None
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=1e-6, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                            scale_init=_ONES, bias_init=_ZEROS, name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=1e-6, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
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
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; x: [B, L, D] -> (x', ffn's LayerOutput).

    The FFN routes all ``B * L`` tokens together. Dropout (rate ``config.dropout_rate``) on both branch
    outputs when not ``ctx.deterministic``. ``ctx`` is the FFN's :class:`~moejax.layers.LayerContext` (token ids,
    the previous routed layer's logits, the model-level ``k``); the returned output carries the logits on.
    """

    config: TransformerConfig
    ffn: FFNSpec
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerOutput]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=ctx.deterministic)
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "attn_norm")(x)
        h = SelfAttention(cfg.num_heads, self.causal, self.rope_base, jnp.dtype(cfg.dtype),
                          jnp.dtype(cfg.param_dtype), name="attn")(h, positions)
        x = constrain(x + drop(h))
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "ffn_norm")(x)
        ffn = make_ffn(self.ffn, kind=cfg.ffn_kind, activation=cfg.activation, use_bias=cfg.use_bias,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ffn")
        out = ffn(h, ctx)
        return constrain(x + drop(out.y)), out


class Encoder(nn.Module):
    """``config.num_layers`` blocks (FFN of block ``i`` = ``config.ffn_specs()[i]``) and a final norm.

    x: [B, L, D] -> (float[B, L, D], tuple of one RoutingStats per block). Blocks are named ``block_{i}``.
    ``ctx`` (created once by the model): its ``token_ids`` int[B, L] (optional; the LM passes its input tokens,
    sharded like the activations' (batch, length) axes; without them, e.g. ViT, a hash router hashes each token's
    index among the ``B * L`` routed) and ``k`` reach every FFN; the MoE++ gating-residual logits flow from block
    to block through ``ctx.router_logits``.
    """

    config: TransformerConfig
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[RoutingStats, ...]]:
        cfg = self.config
        if ctx.token_ids is not None:
            if tuple(ctx.token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"token_ids: expected int[B, L] = {tuple(x.shape[:-1])} (x's leading axes), "
                                 f"got shape {tuple(ctx.token_ids.shape)}")
            ctx = ctx.replace(token_ids=nn.with_logical_constraint(ctx.token_ids, ("batch", "length")))
        stats = []
        for i, spec in enumerate(cfg.ffn_specs()):
            x, out = Block(cfg, spec, self.causal, self.rope_base, name=f"block_{i}")(x, ctx, positions)
            ctx = ctx.replace(router_logits=out.logits)
            stats.append(out.stats)
        return make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "final_norm")(x), tuple(stats)
