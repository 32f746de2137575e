"""Capacity-bounded optimal transport routing: at most C tokens per expert, top-2 of the plan per token.

python -m moejax.main --config=configs/mechanisms/sparse_ot.py --workdir=/tmp/moejax_sparse_ot
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64,
             "router": {"kind": "sparse_ot", "k": 2, "renormalize": True, "balance_iterations": 20},
             "dispatch": {"mode": "capacity", "capacity_factor": 1.25, "eval_capacity_factor": 2.0}}
    return digits_mlp_config([layer, dict(layer)], steps=300)
