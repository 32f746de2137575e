"""Building blocks shared by the models: norms, FFN layers from specs, the pre-norm Transformer stack.

Shapes: ``B`` batch, ``L`` length, ``D`` width. Activations between blocks are constrained to the logical
axes (batch, length, embed); without a mesh and rules this is a no-op.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.layers import LOGIT_LAYERS, DenseLayer, make_layer
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
    """For an ``MoEConfig`` the layer ``spec.layer`` selects (``MoELayer``, ``SoftMoELayer``, ``SMEARLayer``,
    ``ChainOfExpertsLayer``; :func:`moejax.layers.make_layer`), else ``DenseLayer(spec, kind, ...)``; all return
    (y, stats)."""
    if isinstance(spec, MoEConfig):
        return make_layer(spec, name=name)
    return DenseLayer(spec, kind, activation, use_bias, dtype, param_dtype, name=name)


def check_moe_k(moe_k: int | None) -> None:
    """Rejects a model-level ``moe_k`` that is not None or an int >= 1 (before anything is traced)."""
    if moe_k is not None and (isinstance(moe_k, bool) or not isinstance(moe_k, int) or moe_k < 1):
        raise ValueError(f"moe_k={moe_k!r}: must be None (each layer's router.k) or an int >= 1")


def layer_k(spec: FFNSpec, moe_k: int | None) -> int | None:
    """The static ``k=`` a model-level ``moe_k`` gives the layer of ``spec``: ``min(moe_k, spec.num_routed)``
    for routed MoE layers (``layer='sparse'`` or ``'chain'``), None (the layer's own ``router.k``) otherwise.

    The clip is to the layer's number of router outputs: ``num_experts``, plus MoE++ zero-computation experts
    when it has them. So any ``moe_k >= E`` gives every top-k layer all its experts (its dense mixture when
    capacity drops nothing), whatever the layer's size.
    """
    if moe_k is None or not (isinstance(spec, MoEConfig) and spec.layer in LOGIT_LAYERS):
        return None
    return min(moe_k, spec.num_routed)


def apply_ffn(layer: nn.Module, spec: FFNSpec, h: jax.Array, *, deterministic: bool,
              router_logits: jax.Array | None, moe_k: int | None = None, token_ids: jax.Array | None = None
              ) -> tuple[jax.Array, RoutingStats, jax.Array | None]:
    """Calls an FFN layer from :func:`make_ffn`, with a model-level ``k``, MoE++ gating-residual logits and
    token ids.

    Layers with a router that produces logits (``layer='sparse'`` or ``'chain'``) receive ``router_logits``
    when their ``router.gating_residual`` is set, and return their own logits for the next MoE layer. Every
    other layer (dense, Soft MoE, SMEAR) passes ``router_logits`` through unchanged, so the logits flow from
    the most recent sparse/chain MoE layer (also across dense blocks, e.g. with ``moe_every=2``). Hash and
    random routers produce no logits (``None``).

    ``moe_k`` (static; SMoE-Dropout's inference-time number of experts) is passed as ``k=`` to sparse and
    chain layers, clipped by :func:`layer_k`; Soft MoE, SMEAR and dense layers have no ``k`` and ignore it.

    ``token_ids`` int[...] (``h``'s leading shape, e.g. int[B, L]): the vocabulary index of each token, passed
    to sparse and chain layers, whose hash routers (``router.kind='hash'``, Roller et al. 2021) hash them; the
    other routers ignore them. None (models without token ids) makes a hash router hash each token's index in
    the routed group instead. Soft MoE, SMEAR and dense layers take no ids.

    Returns ``(y, stats, logits for the next MoE layer)``.
    """
    if isinstance(spec, MoEConfig) and spec.layer in LOGIT_LAYERS:
        prev = router_logits if spec.router.gating_residual else None
        return layer(h, deterministic=deterministic, router_logits=prev, return_logits=True,
                     k=layer_k(spec, moe_k), token_ids=token_ids)
    y, stats = layer(h, deterministic=deterministic)
    return y, stats, router_logits


def dense_init(out_names: tuple[str | None, ...], in_names: tuple[str | None, ...] = ("embed",),
               init: nn.initializers.Initializer = nn.initializers.lecun_normal()):
    """A kernel initializer of a [in, out] Dense kernel carrying logical axis names ``in_names + out_names``."""
    return nn.with_logical_partitioning(init, (*in_names, *out_names))


def constrain(x: jax.Array) -> jax.Array:
    """x: [B, L, D] annotated with logical axes (batch, length, embed)."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; x: [B, L, D] -> ([B, L, D], stats, logits).

    The FFN routes all ``B * L`` tokens together. Dropout (rate ``config.dropout_rate``) on both branch
    outputs when not ``deterministic``. ``router_logits`` float32[B, L, E] in, logits out: the MoE++
    gating-residual logits threaded by :func:`apply_ffn`. ``moe_k``: a static model-level ``k`` for a routed
    MoE FFN (:func:`layer_k`). ``token_ids`` int[B, L]: the input token ids, for a hash-routed FFN (:func:`apply_ffn`).
    """

    config: TransformerConfig
    ffn: FFNSpec
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool, positions: jax.Array | None = None,
                 router_logits: jax.Array | None = None, moe_k: int | None = None,
                 token_ids: jax.Array | None = None) -> tuple[jax.Array, RoutingStats, jax.Array | None]:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "attn_norm")(x)
        h = SelfAttention(cfg.num_heads, self.causal, self.rope_base, jnp.dtype(cfg.dtype),
                          jnp.dtype(cfg.param_dtype), name="attn")(h, positions)
        x = constrain(x + drop(h))
        h = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "ffn_norm")(x)
        ffn = make_ffn(self.ffn, kind=cfg.ffn_kind, activation=cfg.activation, use_bias=cfg.use_bias,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ffn")
        h, stats, logits = apply_ffn(ffn, self.ffn, h, deterministic=deterministic, router_logits=router_logits,
                                     moe_k=moe_k, token_ids=token_ids)
        return constrain(x + drop(h)), stats, logits


class Encoder(nn.Module):
    """``config.num_layers`` blocks (FFN of block ``i`` = ``config.ffn_specs()[i]``) and a final norm.

    x: [B, L, D] -> (float[B, L, D], tuple of one RoutingStats per block). Blocks are named ``block_{i}``.
    MoE++ gating-residual logits flow from block to block (:func:`apply_ffn`); ``moe_k`` (static) overrides
    ``router.k`` of every routed MoE FFN (:func:`layer_k`). ``token_ids`` int[B, L] (optional; the LM passes its
    input tokens) reach every sparse and chain MoE FFN, sharded like the activations' (batch, length) axes: hash
    routers hash them. Without them (ViT) a hash router hashes each token's index among the ``B * L`` routed.
    """

    config: TransformerConfig
    causal: bool
    rope_base: float | None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool, positions: jax.Array | None = None,
                 moe_k: int | None = None, token_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[RoutingStats, ...]]:
        cfg = self.config
        check_moe_k(moe_k)
        if token_ids is not None:
            if tuple(token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"token_ids: expected int[B, L] = {tuple(x.shape[:-1])} (x's leading axes), "
                                 f"got shape {tuple(token_ids.shape)}")
            token_ids = nn.with_logical_constraint(token_ids, ("batch", "length"))
        stats, logits = [], None
        for i, spec in enumerate(cfg.ffn_specs()):
            x, s, logits = Block(cfg, spec, self.causal, self.rope_base, name=f"block_{i}")(
                x, deterministic=deterministic, positions=positions, router_logits=logits, moe_k=moe_k,
                token_ids=token_ids)
            stats.append(s)
        return make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "final_norm")(x), tuple(stats)
