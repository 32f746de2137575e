"""SMEAR (Muqeet et al. 2023, *Soft Merging of Experts with Adaptive Routing*, arXiv:2306.03745).

Instead of sending a token to a few experts, SMEAR builds one *merged* expert whose parameters are the
router-weighted average of all experts' parameters, ``theta = sum_e p_e theta_e``, and runs it once. The
router is a linear layer plus softmax, ``p = softmax(W r)``; it is trained by ordinary gradients (everything
is differentiable) with no auxiliary loss, and the compute is that of one expert plus the merge.

What is routed (``MoEConfig.smear_granularity``):

* ``example`` (default, the paper's choice): the router input ``r`` is the mean of an example's tokens, and
  all tokens of the example go through the example's merged expert. For x [B, L, D] an example is a
  sequence; for x [B, D] (the MLP classifier) each row is an example of one token. In a causal LM this
  leaks: a token's merged expert depends on later tokens of its sequence (the paper routes encoder inputs
  and ResNet features, where this does not arise); use ``token`` there.
* ``token``: every token is routed on itself and gets its own merged expert (a parameter merge per token:
  ``T`` times the memory of one expert, affordable only for small experts, but causal).

Merging covers weights and biases alike (:func:`~moejax.experts.merge_params`); the merged parameters are
applied with :class:`~moejax.experts.ExpertFFN` over the ``Padded`` grouping of ``N`` groups (examples or tokens).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.context import LayerContext, LayerOutput, as_context
from moejax.experts.ffn import ExpertFFN, ExpertWeights, Padded, merge_params
from moejax.routing.losses import mean_confidence, mean_entropy
from moejax.routing.types import RoutingStats


class SMEARLayer(nn.Module):
    """SMEAR feed-forward layer: ``y, stats = SMEARLayer(config).apply(variables, x)``; x: [..., D].

    Uses ``num_experts``, ``hidden_dim``, ``expert_kind``, ``activation``, ``use_bias``, dtypes and
    ``smear_granularity``; no router kind, ``k``, dispatch or shared experts.

    Parameters (logical axes): ``router/kernel`` float[D, E] (embed, expert), ``N(0, 0.02^2)`` like the sparse
    router; ``experts/...`` stacked as in :class:`~moejax.layers.MoELayer`, so checkpoints of the two share the
    expert layout.

    Stats: ``losses`` empty (the paper uses no auxiliary loss); ``expert_load`` = mean merge weight per expert
    over the routed groups (sums to 1); ``router_entropy`` / ``router_confidence`` of the merge weights;
    ``dropped_fraction`` 0; ``experts_per_token`` 1 (one merged expert runs per token); ``capacity`` 0.
    """

    # Tokens are mixed across the routed group, so a decoded token's output depends on the other tokens of
    # the call: not usable for incremental decoding (moejax.generation refuses it).
    token_wise: ClassVar[bool] = False

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, deterministic: bool | None = None
                 ) -> LayerOutput:
        ctx = as_context(ctx, deterministic)     # no training-only behaviour, no k, no token router
        cfg = self.config
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"x: expected [..., D] with at least 2 axes, got shape {shape}")
        dtype, pdtype, d = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), shape[-1]
        if cfg.resolved_smear_granularity == "example" and x.ndim >= 3:
            groups = x.reshape(-1, shape[-2], d)                                  # [N = B, L, D]
        else:
            groups = x.reshape(-1, 1, d)                                          # [N = T, 1, D]
        groups = groups.astype(dtype)
        router_input = groups.astype(jnp.float32).mean(axis=1)                   # [N, D]
        logits = nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=pdtype,
                          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "expert")),
                          name="router")(router_input)
        probs = jax.nn.softmax(logits, axis=-1)                                   # [N, E]
        stacked = ExpertWeights(cfg.num_experts, cfg.hidden_dim, cfg.expert_kind, cfg.use_bias, param_dtype=pdtype,
                                name="experts")(d)
        # Group n of the N groups goes through one FFN whose parameters are sum_e probs[n, e] * params[e].
        y = ExpertFFN(merge_params(stacked, probs), cfg.expert_kind, cfg.activation, dtype)(groups, Padded())
        zero = jnp.zeros((), jnp.float32)
        stats = RoutingStats(losses={}, dropped_fraction=zero, expert_load=probs.mean(0),
                             router_entropy=mean_entropy(probs), router_confidence=mean_confidence(probs),
                             experts_per_token=jnp.ones((), jnp.float32), capacity=zero)
        return LayerOutput(y.reshape(shape).astype(x.dtype), stats, ctx.router_logits)
