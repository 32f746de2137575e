"""Dense FFN baseline with the MoE layer's interface."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.experts.ffn import Dense, ffn, make_ffn_params
from moejax.context import LayerContext, LayerOutput, as_context
from moejax.routing.types import RoutingStats


class DenseLayer(nn.Module):
    """``out = DenseLayer(...).apply(variables, x)`` (a :class:`~moejax.layers.LayerOutput`): one FFN of width
    ``hidden_dim`` over x: [..., D].

    Returns :meth:`RoutingStats.dense` so that trainers treat MoE and dense models alike. Parameters live
    directly in this module's scope (``w_in`` [D, F] on (embed, mlp), ...).
    """

    hidden_dim: int
    kind: str = "mlp"
    activation: str = "gelu"
    use_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def matching_active(cls, cfg: MoEConfig) -> "DenseLayer":
        """The dense layer with the MoE layer's active width ``K * F`` plus its shared experts."""
        return cls(cfg.router.k * cfg.hidden_dim + cfg.shared_width, cfg.expert_kind, cfg.activation, cfg.use_bias,
                   cfg.dtype, cfg.param_dtype)

    @nn.compact
    def __call__(self, x: jax.Array, ctx: LayerContext | None = None, *, deterministic: bool | None = None
                 ) -> LayerOutput:
        ctx = as_context(ctx, deterministic)     # the MoE layers' signature; nothing depends on it here
        params = make_ffn_params(self, self.kind, x.shape[-1], self.hidden_dim, self.use_bias, None,
                                 jnp.dtype(self.param_dtype))
        y = ffn(params, x.astype(jnp.dtype(self.dtype)), Dense(), kind=self.kind, activation=self.activation)
        return LayerOutput(y.astype(x.dtype), RoutingStats.dense(), ctx.router_logits)
