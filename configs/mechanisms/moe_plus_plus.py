"""MoE++ (Jin et al. 2024): FFN experts plus zero, copy and constant experts under one router,
with gating residuals between the two MoE layers.

python -m moejax.main --config=configs/mechanisms/moe_plus_plus.py --workdir=/tmp/moejax_moe_plus_plus

Both layers have 8 FFN experts and 1 zero, 1 copy and 2 constant experts (12 router outputs, top-2); the
second adds the first layer's router logits to its own. Capacity dispatch: zero-computation copies take
no capacity.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layers = [
        {"num_experts": 8, "hidden_dim": 64, "zero_experts": 1, "copy_experts": 1, "constant_experts": 2,
         "router": {"k": 2, "renormalize": True, "gating_residual": True},
         "dispatch": {"mode": "capacity", "capacity_factor": 1.25}},
        {"num_experts": 8, "hidden_dim": 64, "zero_experts": 1, "copy_experts": 1, "constant_experts": 2,
         "router": {"k": 2, "renormalize": True, "gating_residual": True},
         "dispatch": {"mode": "capacity", "capacity_factor": 1.25}},
    ]
    return digits_mlp_config(layers)
