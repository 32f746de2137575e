"""The learned part of routing: the configured scorer's parameters and logits, the transforms, the kind's rule."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.context import LayerContext, as_context
from moejax.routing import plugin
from moejax.routing.config import RouterConfig
from moejax.routing.types import AnyRouting


class Router(nn.Module):
    """Router logits (float32, from the configured scorer), the configured transforms, and the kind's routing rule.

    The kind (``config.options``, a registered :class:`~moejax.routing.plugin.RouterKind`) decides; the scorer
    (``config.scorer``, a registered :class:`~moejax.routing.scorer.Scorer`) maps the tokens to logits; the transforms
    (``config.transforms``) hook in at the input, the parameters, the logits, the selection and the finished routing
    (:mod:`moejax.routing.plugin`). This module only declares the scorer's parameters and builds the call's context.

    Parameters: the scorer's (:meth:`~moejax.routing.scorer.Scorer.params`), for kinds that route on learned logits:
    ``linear``: ``kernel`` float32[D, E] with logical axes ``('embed', 'expert')``; ``attention`` (Yuan 2.0-M32,
    :mod:`moejax.routing.scorers.attention`): ``kernel``, ``key_kernel``, ``value_kernel``. With
    ``config.frozen`` (SMoE-Dropout) the same parameters live in ``moe_state`` instead: randomly
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
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, capacity: int | None = None,
                 deterministic: bool | None = None, return_logits: bool = False
                 ) -> AnyRouting | tuple[AnyRouting, jax.Array | None]:
        """x: [T, D] -> Routing (token choice) or ExpertChoiceRouting (needs ``capacity``).

        Args:
          ctx: the call context with the routed tokens flattened: ``token_ids`` int[T] for ``kind='hash'`` (default
            ``arange(T)``, a fixed hash of the token's index in the routed group); ``router_logits`` float32[T, E] the
            previous layer's logits (added by the ``gating_residual`` transform); ``k`` a static override of
            ``config.k`` (e.g. SMoE-Dropout's inference-time number of experts); ``deterministic``.
            ``deterministic=`` alone is a shorthand for ``LayerContext(deterministic=...)``.
          capacity: the expert capacity ``C`` (expert choice, ``sparse_ot``).
          return_logits: return ``(routing, logits)``, logits float32[T, E] after the transforms (``None`` for
            kinds without learned logits), so that the next layer can take them as ``ctx.router_logits``.
        """
        ctx = as_context(ctx, deterministic)
        cfg = self.config
        k = cfg.k if ctx.k is None else ctx.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k={k!r}: must be an int in [1, num_experts={self.num_experts}]")
        call = plugin.RouteCall(module=self, train=not ctx.deterministic, k=k, capacity=capacity,
                                num_experts=self.num_experts, num_tokens=x.shape[0], token_ids=ctx.token_ids,
                                prev_logits=ctx.router_logits, transforms=cfg.transforms)
        logits = None
        if plugin.LEARNED in cfg.options.offers:
            h = x.astype(jnp.float32)
            for t in cfg.transforms:
                h = t.on_input(h, call)
            scorer = cfg.scorer_options
            params = {name: self._declare(name, spec) for name, spec in
                      scorer.params(h.shape[-1], self.num_experts).items()}
            logits = scorer.logits(h, params).astype(jnp.float32)
            for t in cfg.transforms:
                logits = t.on_logits(logits, call)
        routing = cfg.options.route(logits, call)
        for t in cfg.transforms:
            routing = t.on_routing(routing, call)
        return (routing, logits) if return_logits else routing

    def _declare(self, name: str, spec) -> jax.Array:
        """A scorer parameter (:class:`~moejax.routing.scorer.ParamSpec`): a param, unless a transform declares it
        (e.g. frozen, in ``moe_state``)."""
        init = nn.with_logical_partitioning(spec.init or self.kernel_init, spec.axes)
        for t in self.config.transforms:
            kernel = t.make_kernel(self, name, init, spec.shape, self.param_dtype)
            if kernel is not None:
                return kernel
        return self.param(name, init, spec.shape, self.param_dtype)
