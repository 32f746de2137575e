"""SMEAR (Muqeet et al. 2023): one merged expert per example out of 8 (then 4) experts.

python -m moejax.main --config=configs/mechanisms/smear.py --workdir=/tmp/moejax_smear

Each example is one token here, so per-example routing is per-token routing.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layers = [
        {"layer": "smear", "num_experts": 8, "hidden_dim": 64, "smear_granularity": "example"},
        {"layer": "smear", "num_experts": 4, "hidden_dim": 64},
    ]
    return digits_mlp_config(layers)
