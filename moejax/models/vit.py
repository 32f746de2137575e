"""ViT-style image classifier with MoE FFNs every ``moe_every`` blocks (V-MoE style, non-causal)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.context import LayerContext
from moejax.models.blocks import Encoder, constrain, dense_init
from moejax.models.config import ViTConfig
from moejax.routing.types import RoutingStats


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images: [B, H, W, C] -> [B, N, P*P*C] with ``N = (H/P) * (W/P)`` patches in row-major order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViTClassifier(nn.Module):
    """``logits, stats = ViTClassifier(cfg).apply(variables, images, deterministic=...)``.

    images: float[B, H, W, C] -> logits float32[B, num_classes], and one RoutingStats per block. Every MoE
    FFN routes all ``B * N`` (``B * (N + 1)`` with a class token) patch tokens together. Patches have no token
    ids: a hash router (``router.kind='hash'``) hashes each patch token's index among those ``B * N`` (a fixed
    assignment by batch row and position), not a vocabulary index as in the Transformer LM.

    Parameters (logical axes): ``patch_embed/kernel`` [P, P, C, D] (conv) or [P*P*C, D] (dense), last axis
    embed; ``pos_embedding`` [N(+1), D] (None, embed); ``cls_token`` [D] (embed); ``encoder/block_{i}/...``;
    ``head/kernel`` [D, num_classes] (embed, None).

    ``moe_k`` (static, optional): experts per token of every routed MoE FFN (``layer='sparse'`` or ``'chain'``),
    clipped to each layer's number of router outputs (:class:`~moejax.layers.MoELayer` clips ``ctx.k``); None keeps each
    layer's ``router.k`` (SMoE-Dropout's inference-time k; ``ValueError`` naming ``moe_k`` unless None or >= 1).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True,
                 moe_k: int | None = None) -> tuple[jax.Array, tuple[RoutingStats, ...]]:
        cfg = self.config
        ctx = LayerContext(deterministic=deterministic, k=moe_k)     # checks moe_k before anything is traced
        expected = (*cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images: expected [B, {', '.join(map(str, expected))}], got shape {images.shape}")
        dtype, pdtype, p = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.patch_size
        images = images.astype(dtype)
        if cfg.patch_embed == "conv":
            x = nn.Conv(cfg.d_model, (p, p), strides=(p, p), padding="VALID", dtype=dtype, param_dtype=pdtype,
                        kernel_init=dense_init(("embed",), (None, None, None)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                        name="patch_embed")(images)
            x = x.reshape(x.shape[0], -1, cfg.d_model)                 # [B, N, D]
        else:
            x = nn.Dense(cfg.d_model, dtype=dtype, param_dtype=pdtype, kernel_init=dense_init(("embed",), (None,)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                         name="patch_embed")(patchify(images, p))
        if cfg.pooling == "cls":
            cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                             (cfg.d_model,), pdtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, cfg.d_model)), x], axis=1)
        pos = self.param("pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                         (x.shape[1], cfg.d_model), pdtype)
        x = constrain(x + pos.astype(dtype))
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x, stats, _ = Encoder(cfg, causal=False, rope_base=None, name="encoder")(x, ctx)
        pooled = x[:, 0] if cfg.pooling == "cls" else x.mean(axis=1)   # [B, D]
        logits = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=pdtype, kernel_init=dense_init((None,)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                          name="head")(pooled)
        return logits.astype(jnp.float32), stats
