"""The MoE layer: router -> dispatch -> experts -> combine, plus shared experts."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import dispatch
from moejax.config import MoEConfig
from moejax.experts.ffn import FFN, Experts
from moejax.routing.router import Router
from moejax.routing.types import RoutingStats


class MoELayer(nn.Module):
    """Sparse MoE feed-forward layer.

    ``y, stats = MoELayer(config).apply(variables, x, deterministic=...)`` with x: [..., D] (e.g.
    [B, L, D]); all leading axes are flattened into ``T`` tokens that are routed together. Returns y with
    x's shape and a :class:`~moejax.routing.RoutingStats`.

    Submodules and parameters (logical axes in parentheses):
      ``router/kernel`` [D, E] (embed, expert); ``experts/w_in`` [E, D, F] (expert, embed, mlp), ... ;
      with shared experts ``shared/w_in`` [D, F_s] (embed, mlp), ...; with ``shared_gate``
      ``shared_gate/kernel`` [D, 1]. With ``router.selection_bias``: ``moe_state/router/selection_bias``.

    ``deterministic=False`` (training) selects the training capacity factor and enables router jitter,
    Gumbel selection noise and gate dropout, which need a ``'jitter'`` RNG. The routing mechanisms
    (top-p, hash, random, noise, frozen routers, gating residuals) are listed in docs/routing_mechanisms.md.
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True, token_ids: jax.Array | None = None,
                 k: int | None = None, router_logits: jax.Array | None = None, return_logits: bool = False
                 ) -> tuple[jax.Array, RoutingStats] | tuple[jax.Array, RoutingStats, jax.Array | None]:
        """x: [..., D] -> (y [..., D], stats), or (y, stats, logits) with ``return_logits``.

        Args:
          token_ids: int[...] (x's leading shape) token ids for ``router.kind='hash'``.
          k: a static override of ``router.k`` (e.g. SMoE-Dropout's inference-time number of experts);
            the capacity follows it.
          router_logits: float32[..., E] the previous MoE layer's router logits (MoE++ gating residual;
            used when ``router.gating_residual``).
          return_logits: also return this layer's router logits float32[..., E] (after the residual;
            ``None`` for hash and random routers), to thread into the next layer's ``router_logits``.
        """
        cfg = self.config
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"x: expected [..., D] with at least 2 axes, got shape {shape}")
        tokens = x.reshape(-1, shape[-1]).astype(jnp.dtype(cfg.dtype))
        num_tokens = tokens.shape[0]
        if k is not None and k != cfg.router.k:
            cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, k=k))
        cap = cfg.capacity(num_tokens, train=not deterministic)
        prev = None if router_logits is None else router_logits.reshape(num_tokens, -1)
        routing, logits = Router(cfg.num_experts, cfg.router, param_dtype=jnp.dtype(cfg.param_dtype), name="router")(
            tokens, capacity=cap, deterministic=deterministic, token_ids=token_ids, prev_logits=prev,
            return_logits=True)
        experts = Experts(cfg.num_experts, cfg.hidden_dim, cfg.expert_kind, cfg.activation, cfg.use_bias,
                          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name="experts")
        gmm = dispatch.get_gmm(cfg.dispatch.gmm, tile=cfg.dispatch.gmm_tile) if cfg.dispatch.mode == "dropless" else None
        y, info = dispatch.apply(tokens, routing, experts, mode=cfg.dispatch.mode, capacity=cap,
                                 capacity_impl=cfg.dispatch.capacity_impl, priority=cfg.dispatch.priority,
                                 grouped_matmul=gmm)
        if cfg.num_shared_experts:
            shared = FFN(cfg.shared_width, cfg.expert_kind, cfg.activation, cfg.use_bias, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), name="shared")(tokens)
            if cfg.shared_gate:
                gate = nn.Dense(1, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                                name="shared_gate")(tokens)
                shared = jax.nn.sigmoid(gate) * shared
            y = y + shared
        stats = RoutingStats(aux=routing.aux, dropped_fraction=info.dropped_fraction, expert_load=info.expert_load,
                             router_entropy=routing.entropy, router_confidence=routing.confidence,
                             experts_per_token=info.experts_per_token, capacity=info.capacity)
        y = y.reshape(shape).astype(x.dtype)
        if return_logits:
            return y, stats, None if logits is None else logits.reshape(*shape[:-1], logits.shape[-1])
        return y, stats
