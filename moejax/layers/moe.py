"""The MoE layer: router -> dispatch -> experts -> combine, plus shared experts."""
from __future__ import annotations

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
    which needs a ``'jitter'`` RNG.
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, RoutingStats]:
        cfg = self.config
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"x: expected [..., D] with at least 2 axes, got shape {shape}")
        tokens = x.reshape(-1, shape[-1]).astype(jnp.dtype(cfg.dtype))
        num_tokens = tokens.shape[0]
        cap = cfg.capacity(num_tokens, train=not deterministic)
        routing = Router(cfg.num_experts, cfg.router, param_dtype=jnp.dtype(cfg.param_dtype), name="router")(
            tokens, capacity=cap, deterministic=deterministic)
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
        return y.reshape(shape).astype(x.dtype), stats
