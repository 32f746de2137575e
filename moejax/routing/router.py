"""The learned part of routing: a linear router that produces logits and calls a routing function."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import RouterConfig
from moejax.routing.expert_choice import expert_choice_routing
from moejax.routing.losses import aux_free_bias_update
from moejax.routing.topk import top_k_routing
from moejax.routing.types import AnyRouting


class Router(nn.Module):
    """Linear router ``logits = x W`` (float32) followed by the configured routing function.

    Parameters: ``kernel`` float32[D, E] with logical axes ``('embed', 'expert')``.
    With ``config.selection_bias`` it also owns ``moe_state/selection_bias`` float32[E], never trained
    by gradient: in training (``deterministic=False``) with ``moe_state`` mutable, it is updated after
    routing by :func:`moejax.routing.aux_free_bias_update` with ``config.bias_update_rate``; the
    routing of the current batch uses the bias from before the update. Jitter noise draws from the
    ``'jitter'`` RNG stream and is applied only when ``deterministic`` is False.
    """

    num_experts: int
    config: RouterConfig
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array, *, capacity: int | None = None, deterministic: bool = True) -> AnyRouting:
        """x: [T, D] -> Routing (top-k) or ExpertChoiceRouting (needs ``capacity``)."""
        cfg = self.config
        x = x.astype(jnp.float32)
        if cfg.jitter_noise > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                       1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
            x = x * noise
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("embed", "expert")),
                            (x.shape[-1], self.num_experts), self.param_dtype)
        logits = x @ kernel.astype(jnp.float32)
        if cfg.kind == "expert_choice":
            if capacity is None:
                raise ValueError("capacity: expert-choice routing needs the expert capacity C")
            return expert_choice_routing(logits, capacity)
        bias_var = None
        if cfg.selection_bias:
            bias_var = self.variable("moe_state", "selection_bias", jnp.zeros, (self.num_experts,), jnp.float32)
        routing = top_k_routing(
            logits, cfg.k, score=cfg.score, renormalize=cfg.renormalize, routed_scaling=cfg.routed_scaling,
            selection_bias=None if bias_var is None else bias_var.value, num_groups=cfg.num_groups,
            top_groups=cfg.top_groups, group_score=cfg.group_score)
        if (bias_var is not None and not deterministic and cfg.bias_update_rate > 0
                and self.is_mutable_collection("moe_state") and not self.is_initializing()):
            bias_var.value = aux_free_bias_update(bias_var.value, routing.expert_load, cfg.bias_update_rate)
        return routing
