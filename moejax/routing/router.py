"""The learned part of routing: a linear router that produces logits and calls a routing function."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import BALANCED_KINDS, RouterConfig
from moejax.routing.attention import attention_router_logits
from moejax.routing.balanced import base_routing, sinkhorn_routing, sparse_ot_routing
from moejax.routing.dynamic import top_p_routing
from moejax.routing.expert_choice import expert_choice_routing
from moejax.routing.fixed import hash_routing, random_routing
from moejax.routing.losses import aux_free_bias_update
from moejax.routing.noise import drop_gates, gumbel_noise
from moejax.routing.threshold import threshold_routing
from moejax.routing.topk import top_k_routing
from moejax.routing.types import AnyRouting


class Router(nn.Module):
    """Linear router ``logits = x W`` (float32) followed by the configured routing function.

    Parameters: ``kernel`` float32[D, E] with logical axes ``('embed', 'expert')``. With
    ``config.logits='attention'`` (Yuan 2.0-M32's attention router, :mod:`moejax.routing.attention`) the
    logits are ``softmax(q k^T) v`` with ``q = x kernel``, ``k = x key_kernel``, ``v = x value_kernel``, all
    three float32[D, E] with the same logical axes (``kernel`` stays the query projection, so code that reads
    or sets the router kernel keeps working). With
    ``config.frozen`` (SMoE-Dropout) the same kernel lives in ``moe_state/kernel`` instead: randomly
    initialised, never trained (no gradient, no optimiser update, no weight decay), but checkpointed
    with the rest of the non-gradient state. ``kind='hash'`` and ``kind='random'`` have no kernel.

    With ``config.selection_bias`` it also owns ``moe_state/selection_bias`` float32[E], never trained
    by gradient: in training (``deterministic=False``) with ``moe_state`` mutable, it is updated after
    routing by :func:`moejax.routing.aux_free_bias_update` with ``config.bias_update_rate``; the
    routing of the current batch uses the bias from before the update.

    Randomness (Switch input jitter, Gumbel selection noise, gate dropout, random routing in training)
    draws from the ``'jitter'`` RNG stream and, except for ``kind='random'``, is applied only when
    ``deterministic`` is False. ``kind='random'`` routes randomly in evaluation too (THOR); without a
    ``'jitter'`` RNG (the trainer's evaluation passes none) it uses a fixed draw from ``config.seed``.

    The balanced kinds (``sinkhorn``, ``base``, ``sparse_ot``) use their plan in training and, unless
    ``config.balance_in_eval``, greedy top-k of the ordinary scores in evaluation (BASE's inference rule).
    ``sparse_ot`` needs ``capacity`` (its ``C`` tokens per expert).
    """

    num_experts: int
    config: RouterConfig
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array, *, capacity: int | None = None, deterministic: bool = True,
                 token_ids: jax.Array | None = None, k: int | None = None,
                 prev_logits: jax.Array | None = None, return_logits: bool = False
                 ) -> AnyRouting | tuple[AnyRouting, jax.Array | None]:
        """x: [T, D] -> Routing (token choice) or ExpertChoiceRouting (needs ``capacity``).

        Args:
          token_ids: int[T] for ``kind='hash'``: the token ids; default ``arange(T)`` (a fixed hash of
            the token's index in the routed group, see :func:`moejax.routing.hash_routing`).
          k: overrides ``config.k`` (experts per token, or the maximum for ``top_p``), e.g. SMoE-Dropout's
            inference-time choice of how many experts to use. A static Python int.
          prev_logits: float32[T, E] the previous layer's router logits, added to this layer's when
            ``config.gating_residual`` (MoE++ gating residuals).
          return_logits: return ``(routing, logits)``, logits float32[T, E] after the residual (``None``
            for hash and random routing), so that the next layer can take them as ``prev_logits``.
        """
        k = self.config.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k={k!r}: must be an int in [1, num_experts={self.num_experts}]")
        routing, logits = self._route(x, capacity, deterministic, token_ids, k, prev_logits)
        return (routing, logits) if return_logits else routing

    def _route(self, x: jax.Array, capacity: int | None, deterministic: bool, token_ids: jax.Array | None,
               k: int, prev_logits: jax.Array | None) -> tuple[AnyRouting, jax.Array | None]:
        cfg = self.config
        train = not deterministic
        t = x.shape[0]
        if cfg.kind == "hash":
            ids = jnp.arange(t) if token_ids is None else token_ids.reshape(-1)
            return self._maybe_drop(hash_routing(ids, self.num_experts, k, seed=cfg.seed), train), None
        if cfg.kind == "random":
            key = self.make_rng("jitter") if self.has_rng("jitter") else jax.random.key(cfg.seed)
            return self._maybe_drop(random_routing(key, t, self.num_experts, k), train), None
        logits = self.logits(x, train)
        if cfg.gating_residual and prev_logits is not None:
            logits = logits + prev_logits.reshape(logits.shape).astype(jnp.float32)
        if cfg.kind == "expert_choice":
            if capacity is None:
                raise ValueError("capacity: expert-choice routing needs the expert capacity C")
            return expert_choice_routing(logits, capacity), logits
        if cfg.kind in BALANCED_KINDS and (train or cfg.balance_in_eval):
            return self._maybe_drop(self._balanced(logits, k, capacity), train), logits
        if cfg.kind == "threshold":
            routing = threshold_routing(logits, cfg.threshold, k, mode=cfg.threshold_mode, score=cfg.score,
                                        renormalize=cfg.renormalize, routed_scaling=cfg.routed_scaling)
            return self._maybe_drop(routing, train), logits
        noise = None
        if cfg.gumbel_noise > 0 and train:
            noise = gumbel_noise(self.make_rng("jitter"), logits.shape, cfg.gumbel_noise)
        if cfg.kind == "top_p":
            routing = top_p_routing(logits, cfg.top_p, k, renormalize=cfg.renormalize,
                                    routed_scaling=cfg.routed_scaling, selection_noise=noise)
            return self._maybe_drop(routing, train), logits
        bias_var = None
        if cfg.selection_bias:
            bias_var = self.variable("moe_state", "selection_bias", jnp.zeros, (self.num_experts,), jnp.float32)
        routing = top_k_routing(
            logits, k, score=cfg.score, renormalize=cfg.renormalize, routed_scaling=cfg.routed_scaling,
            selection_bias=None if bias_var is None else bias_var.value, num_groups=cfg.num_groups,
            top_groups=cfg.top_groups, group_score=cfg.group_score, selection_noise=noise)
        if (bias_var is not None and train and cfg.bias_update_rate > 0
                and self.is_mutable_collection("moe_state") and not self.is_initializing()):
            bias_var.value = aux_free_bias_update(bias_var.value, routing.expert_load, cfg.bias_update_rate)
        return self._maybe_drop(routing, train), logits

    def _balanced(self, logits: jax.Array, k: int, capacity: int | None) -> AnyRouting:
        cfg = self.config
        if cfg.kind == "base":
            return base_routing(logits, score=cfg.score, routed_scaling=cfg.routed_scaling)
        common = dict(iterations=cfg.balance_iterations, temperature=cfg.balance_temperature, score=cfg.score,
                      renormalize=cfg.renormalize, routed_scaling=cfg.routed_scaling)
        if cfg.kind == "sinkhorn":
            return sinkhorn_routing(logits, k, **common)
        if capacity is None:
            raise ValueError("capacity: router.kind='sparse_ot' needs the expert capacity C")
        return sparse_ot_routing(logits, k, capacity, **common)

    def logits(self, x: jax.Array, train: bool) -> jax.Array:
        """float32[T, E] router logits of x: [T, D] (with Switch jitter on x in training)."""
        cfg = self.config
        x = x.astype(jnp.float32)
        if cfg.jitter_noise > 0 and train:
            noise = jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                       1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
            x = x * noise
        kernel = self._kernel("kernel", x.shape[-1])
        if cfg.logits == "attention":
            return attention_router_logits(x, kernel, self._kernel("key_kernel", x.shape[-1]),
                                           self._kernel("value_kernel", x.shape[-1]))
        return x @ kernel.astype(jnp.float32)

    def _kernel(self, name: str, d: int) -> jax.Array:
        """A float[D, E] router projection: a param, or a frozen ``moe_state`` variable (SMoE-Dropout)."""
        shape = (d, self.num_experts)
        init = nn.with_logical_partitioning(self.kernel_init, ("embed", "expert"))
        if self.config.frozen:
            # A non-param variable: the optimiser never sees it, so it stays at its random init.
            kernel = self.variable("moe_state", name,
                                   lambda: nn.unbox(init(self.make_rng("params"), shape, self.param_dtype))).value
            return jax.lax.stop_gradient(kernel)
        return self.param(name, init, shape, self.param_dtype)

    def _maybe_drop(self, routing: AnyRouting, train: bool) -> AnyRouting:
        if self.config.gate_dropout > 0 and train:
            return drop_gates(routing, self.make_rng("jitter"), self.config.gate_dropout)
        return routing
