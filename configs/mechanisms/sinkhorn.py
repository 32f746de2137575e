"""S-BASE (Clark et al. 2022): top-1 of a Sinkhorn-balanced plan in training, greedy top-1 in evaluation.

python -m moejax.main --config=configs/mechanisms/sinkhorn.py --workdir=/tmp/moejax_sinkhorn
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64, "router": {"kind": "sinkhorn", "k": 1, "balance_iterations": 10,
                                                            "balance_temperature": 1.0},
             "dispatch": {"mode": "dropless"}}
    return digits_mlp_config([layer, dict(layer)], steps=300)
