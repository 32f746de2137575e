"""Chain-of-Experts (Wang et al. 2025, *Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models*, arXiv:2506.18945; code github.com/ZihanWang314/coe).

``I = chain_iterations`` routing iterations inside one layer, each with its own router, over one shared set
of experts, with the paper's *inner residual* between iterations:

    x_0 = x,    x_{i+1} = x_i + MoE_i(x_i)   (i = 0 .. I-1),

where ``MoE_i`` is an ordinary :class:`~moejax.layers.MoELayer` whose router is iteration ``i``'s own
("independent gating", which the paper finds necessary: a router shared across iterations did worse than
plain MoE) while the routed experts and the shared experts are the same parameters in every iteration (the
paper's ``CoE-C(K/N)`` reuses the layer's ``N`` experts ``C`` times; its code keeps one expert list and one
shared expert per layer and one gate per iteration).

What the layer returns (our choice): the chain's update ``x_I - x_0 = sum_i MoE_i(x_i)``, so that the layer is a
drop-in FFN for a pre-norm block ``h + ffn(norm(h))`` and one iteration is exactly a plain MoE layer. The
paper's code instead makes the block output ``x_I`` itself, started from ``x_0 = norm(h)`` (it replaces the
block's outer residual ``h`` by the inner residual chain); ours keeps ``h`` on the residual stream and adds
the same chain of updates.

Every iteration routes with the full configured ``router.k`` (the paper's ``CoE-2(4/64)`` is 4 experts per
iteration: set ``router.k`` to the per-iteration count). With ``router.gating_residual`` the logits are threaded
from iteration to iteration (and from the previous layer into the first iteration). MoE++ constant experts,
the shared-expert gate and the selection bias belong to each iteration's ``MoELayer`` (one set per iteration).
"""
from __future__ import annotations

from typing import ClassVar

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.experts.ffn import FFN, ExpertWeights
from moejax.context import LayerContext, LayerOutput, as_context
from moejax.layers.moe import MoELayer
from moejax.routing.loss import sum_losses
from moejax.routing.types import RoutingStats


def chain_stats(stats: list[RoutingStats] | tuple[RoutingStats, ...]) -> RoutingStats:
    """One RoutingStats for a chain: losses (by name) and ``experts_per_token`` summed over iterations (each router
    is penalised as a layer of its own would be; the experts applied per token add up along the chain);
    ``dropped_fraction``, ``expert_load``, router entropy and confidence averaged; ``capacity`` of the first
    iteration (all iterations route the same number of tokens with the same config)."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return RoutingStats(losses=sum_losses(s.losses for s in stats), dropped_fraction=mean([s.dropped_fraction for s in stats]),
                        expert_load=mean([s.expert_load for s in stats]),
                        router_entropy=mean([s.router_entropy for s in stats]),
                        router_confidence=mean([s.router_confidence for s in stats]),
                        experts_per_token=sum(s.experts_per_token for s in stats), capacity=stats[0].capacity)


class ChainOfExpertsLayer(nn.Module):
    """``out = ChainOfExpertsLayer(config).apply(variables, x, ctx)`` (a ``LayerOutput``); x: [..., D].

    Parameters: ``experts/...`` and ``shared/...`` (one set, used by every iteration), and per iteration ``i``
    the ``iteration_{i}/router/...`` (plus ``iteration_{i}/shared_gate``, ``iteration_{i}/zero_computation`` where
    configured). The context is that of :class:`~moejax.layers.MoELayer` (``k`` applies to every iteration, the
    logits flow from iteration to iteration; ``out.logits`` are the last iteration's). Stats: :func:`chain_stats`.
    """

    # A token's output depends on that token alone (given a token-choice router and dropless dispatch), so
    # incremental decoding equals full recomputation (moejax.generation checks this flag).
    token_wise: ClassVar[bool] = True

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, deterministic: bool | None = None
                 ) -> LayerOutput:
        ctx = as_context(ctx, deterministic)
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        step_cfg = dataclasses.replace(cfg, layer="sparse", chain_iterations=None)
        experts = ExpertWeights(cfg.num_experts, cfg.hidden_dim, cfg.expert_kind, cfg.use_bias, param_dtype=pdtype,
                                name="experts")
        shared = None
        if cfg.num_shared_experts:
            shared = FFN(cfg.shared_width, cfg.expert_kind, cfg.activation, cfg.use_bias, dtype=dtype,
                         param_dtype=pdtype, name="shared")
        h, update, stats = x, jnp.zeros_like(x), []
        for i in range(cfg.resolved_chain_iterations):
            out = MoELayer(step_cfg, experts_module=experts, shared_module=shared, name=f"iteration_{i}")(h, ctx)
            ctx = ctx.replace(router_logits=out.logits)
            h = h + out.y
            update = update + out.y
            stats.append(out.stats)
        return LayerOutput(update, chain_stats(stats), ctx.router_logits)
