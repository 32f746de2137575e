"""Builds an MoE layer, applies it to random tokens and prints the routing statistics.

``python -m moejax.demo`` — runs on CPU in seconds with no network. The same code is the README's
minimal example (the test suite executes both).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig


def main() -> None:
    cfg = MoEConfig(
        num_experts=8, hidden_dim=128, expert_kind="glu", activation="silu", use_bias=False,
        num_shared_experts=1,
        router=RouterConfig(k=2, renormalize=True),
        dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0, capacity_impl="index"),
    )
    x = jax.random.normal(jax.random.key(0), (4, 64, 32))            # [B, L, D]
    layer = MoELayer(cfg)
    variables = nn.unbox(layer.init(jax.random.key(1), x))
    out = jax.jit(lambda v, x: layer.apply(v, x, deterministic=False))(variables, x)
    y, stats = out.y, out.stats
    print("output", y.shape, y.dtype)
    print(f"capacity C={int(stats.capacity)}  dropped={float(stats.dropped_fraction):.3f}  "
          f"experts/token={float(stats.experts_per_token):.2f}")
    print("expert load", np.round(np.asarray(stats.expert_load), 3))
    losses = "  ".join(f"{name}={float(v):.6f}" for name, v in stats.losses.items())
    print(f"weighted losses: {losses}  router entropy={float(stats.router_entropy):.3f}")


if __name__ == "__main__":
    main()
