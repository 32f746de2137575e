"""Building blocks shared by the models: norms, FFN layers from specs, the pre-norm Transformer stack.

Shapes: ``B`` batch, ``L`` length, ``D`` width. Activations between blocks are constrained to the logical
axes (batch, length, embed); without a mesh and rules this is a no-op.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.layers import DenseLayer, MoELayer
from moejax.models.attention import SelfAttention
from moejax.models.config import FFNSpec, TransformerConfig
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
    """``MoELayer(spec)`` for an ``MoEConfig``, else ``DenseLayer(spec, kind, ...)``; both return (y, stats)."""
    if isinstance(spec, MoEConfig):
        return MoELayer(spec, name=name)
    return DenseLayer(spec, kind, activation, use_bias, dtype, param_dtype, name=name)


def dense_init(out_names: tuple[str | None, ...], in_names: tuple[str | None, ...] = ("embed",),
               init: nn.initializers.Initializer = nn.initializers.lecun_normal()):
    """A kernel initializer of a [in, out] Dense kernel carrying logical axis names ``in_names + out_names``."""
    return nn.with_logical_partitioning(init, (*in_names, *out_names))


def constrain(x: jax.Array) -> jax.Array:
    """x: [B, L, D] annotated with logical axes (batch, length, embed)."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; x: [B, L, D] -> ([B, L, D], stats).

    The FFN routes all ``B * L`` tokens together. Dropout (rate ``config.dropout_rate``) on both branch
    outputs when not ``deterministic``.
    """

    config: TransformerConfig
    ffn: FFNSpec
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool,
                 positions: jax.Array | None = None) -> tuple[jax.Array, RoutingStats]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "attn_norm")(x)
        h = SelfAttention(cfg.num_heads, self.causal, self.rope_base, jnp.dtype(cfg.dtype),
                          jnp.dtype(cfg.param_dtype), name="attn")(h, positions)
        x = constrain(x + drop(h))
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "ffn_norm")(x)
        h, stats = make_ffn(self.ffn, kind=cfg.ffn_kind, activation=cfg.activation, use_bias=cfg.use_bias,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ffn")(h, deterministic=deterministic)
        return constrain(x + drop(h)), stats


class Encoder(nn.Module):
    """``config.num_layers`` blocks (FFN of block ``i`` = ``config.ffn_specs()[i]``) and a final norm.

    x: [B, L, D] -> (float[B, L, D], tuple of one RoutingStats per block). Blocks are named ``block_{i}``.
    """

    config: TransformerConfig
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool,
                 positions: jax.Array | None = None) -> tuple[jax.Array, tuple[RoutingStats, ...]]:
        cfg = self.config
        stats = []
        for i, spec in enumerate(cfg.ffn_specs()):
            x, s = Block(cfg, spec, self.causal, self.rope_base, name=f"block_{i}")(
                x, deterministic=deterministic, positions=positions)
            stats.append(s)
        return make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "final_norm")(x), tuple(stats)
