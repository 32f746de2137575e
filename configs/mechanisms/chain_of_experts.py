"""Chain-of-Experts (Wang et al. 2025): 2 routing iterations over 8 shared experts, top-1 per iteration,
an independent router per iteration.

python -m moejax.main --config=configs/mechanisms/chain_of_experts.py --workdir=/tmp/moejax_chain_of_experts

Compared with a top-2 MoE layer, the same expert compute per token is spent sequentially: the second
iteration routes on the output of the first.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layers = [
        {"layer": "chain", "chain_iterations": 2, "num_experts": 8, "hidden_dim": 64,
         "router": {"k": 1}, "dispatch": {"mode": "dropless"}},
        {"num_experts": 4, "hidden_dim": 64, "router": {"k": 1}, "dispatch": {"mode": "dropless"}},
    ]
    return digits_mlp_config(layers)
