"""Soft MoE (Puigcerver et al. 2023): two Soft MoE layers, 8 experts with 2 slots each, normalised logits.

python -m moejax.main --config=configs/mechanisms/soft_moe.py --workdir=/tmp/moejax_soft_moe

Each batch of 64 examples is one routed group of 64 tokens: every slot mixes the whole batch, so a
prediction depends on the other examples of its batch (Soft MoE is not per-example).

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layers = [
        {"layer": "soft", "num_experts": 8, "hidden_dim": 64, "soft_slots": 2, "soft_normalize": True},
        {"layer": "soft", "num_experts": 4, "hidden_dim": 64, "soft_slots": 2},
    ]
    return digits_mlp_config(layers)
