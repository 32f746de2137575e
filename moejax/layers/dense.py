"""Dense FFN baseline with the MoE layer's interface."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.experts.ffn import FFN
from moejax.routing.types import RoutingStats


class DenseLayer(nn.Module):
    """``y, stats = DenseLayer(...).apply(variables, x)``: one FFN of width ``hidden_dim`` over x: [..., D].

    Returns :meth:`RoutingStats.dense` so that trainers treat MoE and dense models alike. Parameters live
    under ``ffn/`` with logical axes (embed, mlp).
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
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, RoutingStats]:
        del deterministic  # same signature as MoELayer
        y = FFN(self.hidden_dim, self.kind, self.activation, self.use_bias, dtype=jnp.dtype(self.dtype),
                param_dtype=jnp.dtype(self.param_dtype), name="ffn")(x)
        return y.astype(x.dtype), RoutingStats.dense()
