"""MLP classifier whose FFN layers each have their own spec (MoE or dense): schedules and deep MoE."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.context import LayerContext
from moejax.models.blocks import dense_init, make_ffn, make_norm
from moejax.models.config import MLPConfig
from moejax.routing.types import RoutingStats


class MLPClassifier(nn.Module):
    """``logits, stats = MLPClassifier(cfg).apply(variables, x, deterministic=...)``.

    x: float[B, ...] is flattened to [B, F_in] and projected to [B, D]; layer ``i`` computes
    ``x + ffn_i(norm_i(x))`` (``residual=True``) or ``ffn_i(norm_i(x))``, with ``ffn_i`` the MoE or dense layer
    of ``config.layers[i]``; each example is one token for routing (``T = B``). Returns logits
    float32[B, num_classes] and one RoutingStats per layer. MoE++ gating-residual router logits flow from each
    sparse/chain MoE layer to the next one (through ``LayerContext.router_logits``). The classifier has no token
    ids: a hash router (``router.kind='hash'``) hashes each example's index in its batch, a fixed pseudo-random
    assignment (the Transformer LM hashes token ids instead).

    ``moe_k`` (static, optional): the number of experts per token of every routed MoE layer (``layer='sparse'``
    or ``'chain'``), clipped to each layer's number of router outputs
    (:class:`~moejax.layers.MoELayer` clips ``ctx.k``); None keeps each layer's ``router.k``. SMoE-Dropout (Chen et al.
    2023) trains with a frozen router and a growing k and evaluates at any k; a ``ValueError`` naming
    ``moe_k`` is raised for anything but None or an int >= 1.

    Parameters (logical axes): ``input/kernel`` [F_in, D] (None, embed); ``layer_{i}_norm/scale`` [D] (embed);
    ``layer_{i}/...`` (the MoE or dense layer); ``final_norm/scale`` [D] (embed); ``head/kernel``
    [D, num_classes] (embed, None).
    """

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True,
                 moe_k: int | None = None) -> tuple[jax.Array, tuple[RoutingStats, ...]]:
        cfg = self.config
        ctx = LayerContext(deterministic=deterministic, k=moe_k)     # checks moe_k before anything is traced
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if x.ndim < 2:
            raise ValueError(f"x: expected [B, ...] with at least 2 axes, got shape {x.shape}")
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
        x = nn.Dense(cfg.d_model, dtype=dtype, param_dtype=pdtype, kernel_init=dense_init(("embed",), (None,)),
                     bias_init=bias_init, name="input")(x.reshape(x.shape[0], -1).astype(dtype))
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        stats = []
        for i, spec in enumerate(cfg.layers):
            h = x
            norm = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, f"layer_{i}_norm")
            if norm is not None:
                h = norm(h)
            ffn = make_ffn(spec, kind=cfg.ffn_kind, activation=cfg.activation, use_bias=cfg.use_bias,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"layer_{i}")
            out = ffn(h, ctx)
            ctx = ctx.replace(router_logits=out.logits)
            h = nn.with_logical_constraint(drop(out.y), ("batch", "embed"))
            x = x + h if cfg.residual else h
            stats.append(out.stats)
        norm = make_norm(cfg.norm, cfg.dtype, cfg.param_dtype, "final_norm")
        if norm is not None:
            x = norm(x)
        logits = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=pdtype, kernel_init=dense_init((None,)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                          name="head")(x)
        return logits.astype(jnp.float32), tuple(stats)
