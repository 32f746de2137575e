"""The MoE layer: router -> dispatch -> experts -> combine, plus shared experts."""
from __future__ import annotations

from typing import ClassVar

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.context import LayerContext, LayerOutput, as_context
from moejax.dispatch import dispatchers
from moejax.dispatch.info import DispatchInfo
from moejax.experts.ffn import FFN, ExpertFFN, ExpertWeights
from moejax.experts.zero_computation import ZeroComputationExperts, split_routing
from moejax.routing.config import RouterConfig
from moejax.routing.loss import loss_inputs, weighted_losses
from moejax.routing.router import Router
from moejax.routing.types import AnyRouting, Routing, RoutingStats


class MoELayer(nn.Module):
    """Sparse MoE feed-forward layer.

    ``out = MoELayer(config).apply(variables, x, ctx)`` with x: [..., D] (e.g. [B, L, D]); all leading axes
    are flattened into ``T`` tokens that are routed together. Returns a :class:`~moejax.layers.LayerOutput`:
    ``out.y`` with x's shape, ``out.stats`` a :class:`~moejax.routing.RoutingStats`, ``out.logits``.

    Parameters (logical axes in parentheses), ``E`` = ``num_experts``, ``E_r`` = ``num_routed``:
      ``router/kernel`` float32[D, E_r] (embed, expert) (with ``router.scorer='attention'`` also
      ``router/key_kernel`` and ``router/value_kernel``; absent for hash and random routers);
      ``expert_kind='mlp'``: ``experts/w_in`` [E, D, F] (expert, embed, mlp), ``experts/w_out`` [E, F, D]
      (expert, mlp, embed), with ``use_bias`` ``experts/b_in`` [E, F], ``experts/b_out`` [E, D];
      ``expert_kind='glu'``: ``experts/w_gate``, ``experts/w_up`` [E, D, F], ``experts/w_down`` [E, F, D], with
      ``use_bias`` ``b_gate``, ``b_up`` [E, F], ``b_down`` [E, D];
      shared experts: the same names unstacked under ``shared/`` (``shared/w_in`` [D, F_s] with
      ``F_s = num_shared_experts * shared_hidden_dim``, ...); ``shared_gate/kernel`` [D, 1] (``shared_gate``);
      MoE++ constant experts: ``zero_computation/...`` (:class:`~moejax.experts.ZeroComputationExperts`).
    Non-gradient state (collection ``moe_state``): ``router/selection_bias`` float32[E_r]
    (``router.selection_bias``; apply() must be given it), ``router/kernel`` when ``router.frozen``.
    With the ``routing`` collection mutable, a token-choice layer records ``expert_index`` int32[..., K] (-1 for an
    empty slot) and ``weight`` float32[..., K] of every token (``flax`` ``sow``; nothing is recorded otherwise).

    ``ctx.deterministic=False`` (training) selects the training capacity factor and enables router jitter,
    Gumbel selection noise and gate dropout, which need a ``'jitter'`` RNG. The routing mechanisms
    (top-p, hash, random, noise, frozen routers, gating residuals) are listed in docs/routing_mechanisms.md.

    MoE++ zero-computation experts (``zero_experts``, ``copy_experts``, ``constant_experts``): the router has
    ``num_routed`` outputs (FFN experts first); :func:`~moejax.experts.split_routing` hands dispatch only the
    copies sent to FFN experts, so the others occupy no buffer slot and no capacity, and
    ``zero_computation/...`` (:class:`~moejax.experts.ZeroComputationExperts`) adds their outputs. Then
    ``stats.expert_load`` has ``num_routed`` entries (processed copies per router output, zero-computation
    copies are never dropped), ``stats.dropped_fraction`` is dropped FFN copies / all valid copies, and
    ``stats.experts_per_token`` counts FFN experts only (the compute per token).

    Dispatch is the :class:`~moejax.dispatch.Dispatcher` of ``config.dispatch`` (:func:`moejax.dispatch.from_config`;
    expert-parallel under a mesh with an ``expert`` axis); the experts are an :class:`~moejax.experts.ExpertFFN` over
    the parameters of :class:`~moejax.experts.ExpertWeights`.

    ``experts_module`` (an ``ExpertWeights``) and ``shared_module`` let a parent share one set of experts between
    several layers (Chain-of-Experts iterations); by default the layer owns ``experts`` and ``shared``.
    """

    # A token's output depends on that token alone (given a token-choice router and dropless dispatch), so
    # incremental decoding equals full recomputation (moejax.generation checks this flag).
    token_wise: ClassVar[bool] = True

    config: MoEConfig
    experts_module: nn.Module | None = None
    shared_module: nn.Module | None = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, deterministic: bool | None = None
                 ) -> LayerOutput:
        """x: [..., D] -> ``LayerOutput(y [..., D], stats, logits float32[..., num_routed] or None)``.

        ``ctx`` (:class:`~moejax.layers.LayerContext`): ``token_ids`` int[...] (x's leading shape) for hash routers;
        ``router_logits`` float32[..., E] the previous routed layer's logits (used by a gating-residual router);
        ``k`` a static override of ``router.k``, clipped to ``num_routed`` (the capacity follows it);
        ``deterministic``. ``deterministic=`` alone is a shorthand for ``LayerContext(deterministic=...)``.
        ``out.logits`` are this layer's router logits after the residual (None for routers without logits).
        """
        ctx = as_context(ctx, deterministic)
        cfg = self.config
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"x: expected [..., D] with at least 2 axes, got shape {shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x: expected a floating dtype, got {x.dtype} (shape {shape})")
        tokens = x.reshape(-1, shape[-1]).astype(jnp.dtype(cfg.dtype))
        num_tokens = tokens.shape[0]
        if num_tokens == 0 and not self.is_initializing():
            return _empty_output(x, cfg)
        k = None if ctx.k is None else min(ctx.k, cfg.num_routed)
        if k is not None and k != cfg.router.k:
            cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, k=k))
        train = not ctx.deterministic
        groups = cfg.dispatch.num_groups(num_tokens, shape)
        cap, group_cap = cfg.capacity(num_tokens, train=train), cfg.capacity(num_tokens // groups, train=train)
        flat = ctx.replace(token_ids=None if ctx.token_ids is None else ctx.token_ids.reshape(-1),
                           router_logits=None if ctx.router_logits is None
                           else ctx.router_logits.reshape(num_tokens, -1), k=None)    # k: already in cfg
        routing, logits = Router(cfg.num_routed, cfg.router, param_dtype=jnp.dtype(cfg.param_dtype), name="router")(
            tokens, flat, capacity=cap, return_logits=True)
        if isinstance(routing, Routing) and not self.is_initializing():
            # Which experts each token used, for analysis (moejax.lm_eval, expert surgery): a no-op unless the
            # caller makes the 'routing' collection mutable (never at init, so it never enters a train state's
            # non-gradient collections). Empty slots of dynamic-k routers read -1.
            lead = shape[:-1]
            self.sow("routing", "expert_index", jnp.where(routing.valid, routing.expert_index, -1).reshape(*lead, -1))
            self.sow("routing", "weight", routing.weight.reshape(*lead, -1))
        ffn_routing = routing
        if cfg.num_zero_computation:
            ffn_routing, zc_index, zc_weight = split_routing(routing, cfg.num_experts)
        weights = self.experts_module
        if weights is None:
            weights = ExpertWeights(cfg.num_experts, cfg.hidden_dim, cfg.expert_kind, cfg.use_bias,
                                    param_dtype=jnp.dtype(cfg.param_dtype), name="experts")
        experts = ExpertFFN(weights(shape[-1]), cfg.expert_kind, cfg.activation, jnp.dtype(cfg.dtype))
        y, info = dispatchers.from_config(cfg.dispatch, group_cap, groups)(tokens, ffn_routing, experts)
        if cfg.num_zero_computation:
            y = y + ZeroComputationExperts(cfg.zero_experts, cfg.copy_experts, cfg.constant_experts,
                                           dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                           name="zero_computation")(tokens, zc_index, zc_weight)
            info = _with_zero_computation(info, routing, ffn_routing)
        if cfg.num_shared_experts:
            shared_ffn = self.shared_module
            if shared_ffn is None:
                shared_ffn = FFN(cfg.shared_width, cfg.expert_kind, cfg.activation, cfg.use_bias,
                                 dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name="shared")
            shared = shared_ffn(tokens)
            if cfg.shared_gate:
                gate = nn.Dense(1, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                                name="shared_gate")(tokens)
                shared = jax.nn.sigmoid(gate) * shared
            y = y + shared
        # MoE++'s heterogeneous load balance: zero-computation outputs' loads count tau times (1.0: the plain loss).
        balance = jnp.where(jnp.arange(cfg.num_routed) < cfg.num_experts, 1.0, cfg.zero_computation_tau)
        stats = layer_stats(cfg.router, routing, logits, info, balance.astype(jnp.float32))
        logits = None if logits is None else logits.reshape(*shape[:-1], logits.shape[-1])
        return LayerOutput(y.reshape(shape).astype(x.dtype), stats, logits)


def layer_stats(router: RouterConfig, routing: AnyRouting, logits: jax.Array | None, info: DispatchInfo,
                balance_weights: jax.Array) -> RoutingStats:
    """The layer's :class:`RoutingStats`, built once from its routing decision, the router's logits (float32[T, E]
    after the transforms, or None) and the dispatch's counts: the router's active losses, weighted
    (:mod:`moejax.routing.loss`), and the load, drop and confidence statistics."""
    inputs = loss_inputs(routing, logits, balance_weights)
    return RoutingStats(losses=weighted_losses(router.active_losses, inputs), dropped_fraction=info.dropped_fraction,
                        expert_load=info.expert_load, router_entropy=routing.entropy,
                        router_confidence=routing.confidence, experts_per_token=info.experts_per_token,
                        capacity=info.capacity)


def _with_zero_computation(info: DispatchInfo, routing: Routing, ffn_routing: Routing) -> DispatchInfo:
    """Dispatch statistics of the FFN experts extended to all ``num_routed`` router outputs (see MoELayer)."""
    num_ffn, num_routed = ffn_routing.num_experts, routing.num_experts
    kept_ffn = info.experts_per_token * routing.num_tokens
    to_zc = routing.valid & ~ffn_routing.valid
    zc_counts = jnp.einsum("tk,tke->e", to_zc.astype(jnp.float32),
                           jax.nn.one_hot(routing.expert_index - num_ffn, num_routed - num_ffn, dtype=jnp.float32))
    counts = jnp.concatenate([info.expert_load * kept_ffn, zc_counts])
    valid_ffn = ffn_routing.valid.sum().astype(jnp.float32)
    return info.replace(
        expert_load=counts / jnp.maximum(counts.sum(), 1.0),
        dropped_fraction=(valid_ffn - kept_ffn) / jnp.maximum(routing.valid.sum().astype(jnp.float32), 1.0))


def _empty_output(x: jax.Array, cfg: MoEConfig) -> LayerOutput:
    """The output for ``T = 0`` tokens: an empty ``y``, zero statistics, empty logits (nothing routed, nothing run)."""
    zero = jnp.zeros((), jnp.float32)
    stats = RoutingStats(losses={}, dropped_fraction=zero,
                         expert_load=jnp.zeros((cfg.num_routed,), jnp.float32), router_entropy=zero,
                         router_confidence=zero, experts_per_token=zero, capacity=zero)
    logits = None
    if "learned" in cfg.router.options.offers:
        logits = jnp.zeros((*x.shape[:-1], cfg.num_routed), jnp.float32)
    return LayerOutput(jnp.zeros_like(x), stats, logits)
