"""Soft MoE (Puigcerver et al. 2023, *From Sparse to Soft Mixtures of Experts*, arXiv:2308.00951).

Within each routed group of ``M`` tokens ``X`` float[M, D], every expert has ``S`` *slots*. With the slot
parameters ``Phi`` float[D, E, S] and logits ``L = X Phi`` float[M, E, S]:

* dispatch weights ``D = softmax(L)`` over the ``M`` tokens, per slot: slot ``(e, s)`` takes the convex
  combination ``X~[e, s] = sum_m D[m, e, s] X[m]``;
* the stacked experts process their slots: ``Y~[e] = f_e(X~[e])`` (:class:`~moejax.experts.ExpertFFN` with the
  :class:`~moejax.experts.Padded` grouping, ``C = G * S`` slots per expert);
* combine weights ``C = softmax(L)`` over the ``E * S`` slots, per token: ``Y[m] = sum_{e,s} C[m, e, s] Y~[e, s]``.

Nothing is dropped and every token reaches every expert (through its share of the slots), so there is no
load-balancing loss (the paper uses none) and the layer is fully differentiable. Tokens of one group mix:
the layer is not causal (the paper notes this for autoregressive decoders), and the output of a token
depends on the other tokens of its group.

Normalisation (``MoEConfig.soft_normalize``, the paper's section 2.3): ``L = scale * l2n(X) l2n(Phi)`` with
``l2n`` normalising each token over ``D`` and each slot's column of ``Phi`` over ``D``, and ``scale`` a learned
scalar initialised to 1. Only the *logits* use the normalised tokens; the slots mix the original tokens (the
paper's algorithm normalises inside the router; the authors' V-MoE code does the same). ``l2n(v) = v /
sqrt(sum v^2 + 1e-6)``: the epsilon is our choice (the paper states none) and only matters for zero vectors.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import MoEConfig
from moejax.experts.ffn import ExpertFFN, ExpertWeights, Padded
from moejax.context import LayerContext, LayerOutput, as_context
from moejax.routing.losses import mean_confidence, mean_entropy
from moejax.routing.types import RoutingStats


@struct.dataclass
class SoftRouting:
    """Soft routing of ``G`` groups of ``M`` tokens into ``E * S`` slots.

    Attributes:
      dispatch: float32[G, M, E, S], softmax over ``M``: ``dispatch[g, :, e, s]`` sums to 1.
      combine: float32[G, M, E, S], softmax over ``(E, S)``: ``combine[g, m]`` sums to 1.
      logits: float32[G, M, E, S].
    """

    dispatch: jnp.ndarray
    combine: jnp.ndarray
    logits: jnp.ndarray

    @property
    def expert_share(self) -> jnp.ndarray:
        """float32[G, M, E]: the share of each expert in each token's output (sums to 1 over E)."""
        return self.combine.sum(-1)


def soft_routing(logits: jax.Array) -> SoftRouting:
    """Dispatch and combine weights from slot logits float[G, M, E, S] (the same logits, two softmaxes)."""
    logits = logits.astype(jnp.float32)
    g, m, e, s = logits.shape
    dispatch = jax.nn.softmax(logits, axis=1)
    combine = jax.nn.softmax(logits.reshape(g, m, e * s), axis=-1).reshape(g, m, e, s)
    return SoftRouting(dispatch=dispatch, combine=combine, logits=logits)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_logits(x: jax.Array, phi: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """float32[G, M, E, S] slot logits of x: [G, M, D] and phi: [D, E, S]; with ``scale`` (a scalar) the
    paper's normalised form ``scale * l2n(x) . l2n(phi)``, else the plain ``x . phi``."""
    x, phi = x.astype(jnp.float32), phi.astype(jnp.float32)
    if scale is not None:
        x, phi = l2_normalize(x, -1), scale.astype(jnp.float32) * l2_normalize(phi, 0)
    return jnp.einsum("gmd,des->gmes", x, phi)


class SoftMoELayer(nn.Module):
    """Soft MoE feed-forward layer: ``out = SoftMoELayer(config).apply(variables, x, ctx)`` -> ``LayerOutput``.

    x: [..., M, D]: the second-to-last axis holds the ``M`` tokens of a routed group and every leading axis
    indexes groups (``[B, L, D]``: one group per sequence, as in the paper; ``[B, D]``, e.g. the MLP
    classifier: the whole batch is one group of ``B`` tokens). ``S = config.soft_slots`` slots per expert and
    group. Uses ``num_experts``, ``hidden_dim``, ``expert_kind``, ``activation``, ``use_bias``, dtypes,
    ``soft_slots`` and ``soft_normalize``; no router kind, dispatch, capacity or shared experts.

    Parameters (logical axes): ``phi`` float[D, E, S] (embed, expert, None), LeCun normal over ``D``;
    ``scale`` float[] (normalisation only), init 1; ``experts/...`` as in :class:`~moejax.layers.MoELayer`.

    Stats: ``losses`` empty; ``expert_load[e]`` = mean over tokens of expert ``e``'s share of the combine
    weights (sums to 1); ``router_entropy`` / ``router_confidence`` of that per-token expert share;
    ``dropped_fraction`` 0; ``experts_per_token`` = E (each token reaches every expert); ``capacity`` = S.
    """

    # Tokens are mixed across the routed group, so a decoded token's output depends on the other tokens of
    # the call: not usable for incremental decoding (moejax.generation refuses it).
    token_wise: ClassVar[bool] = False

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, deterministic: bool | None = None
                 ) -> LayerOutput:
        # Soft MoE has no training-only behaviour (no noise, no capacity factor), no k and no token router.
        ctx = as_context(ctx, deterministic)
        cfg = self.config
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"x: expected [..., M, D] with at least 2 axes, got shape {shape}")
        e, s, d = cfg.num_experts, cfg.resolved_soft_slots, shape[-1]
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        xg = x.reshape(-1, shape[-2], d).astype(dtype)                           # [G, M, D]
        g = xg.shape[0]
        phi = self.param("phi", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", "expert", None)), (d, e, s), pdtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ()), (), pdtype) \
            if cfg.soft_normalize else None
        routing = soft_routing(soft_logits(xg, phi, scale))
        slots = jnp.einsum("gmes,gmd->egsd", routing.dispatch.astype(dtype), xg).reshape(e, g * s, d)
        params = ExpertWeights(e, cfg.hidden_dim, cfg.expert_kind, cfg.use_bias, param_dtype=pdtype, name="experts")(d)
        ys = ExpertFFN(params, cfg.expert_kind, cfg.activation, dtype)(slots, Padded()).reshape(e, g, s, d)
        y = jnp.einsum("gmes,egsd->gmd", routing.combine.astype(ys.dtype), ys)
        share = routing.expert_share.reshape(-1, e)
        zero = jnp.zeros((), jnp.float32)
        stats = RoutingStats(losses={}, dropped_fraction=zero, expert_load=share.mean(0),
                             router_entropy=mean_entropy(share), router_confidence=mean_confidence(share),
                             experts_per_token=jnp.asarray(e, jnp.float32), capacity=jnp.asarray(s, jnp.float32))
        return LayerOutput(y.reshape(shape).astype(x.dtype), stats, ctx.router_logits)
