"""BASE layers (Lewis et al. 2021): balanced assignment (exactly T/E tokens per expert) in training,
greedy top-1 in evaluation, sigmoid gate.

python -m moejax.main --config=configs/mechanisms/base_layers.py --workdir=/tmp/moejax_base_layers
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64, "router": {"kind": "base", "k": 1, "score": "sigmoid"},
             "dispatch": {"mode": "dropless"}}
    return digits_mlp_config([layer, dict(layer)], steps=300)
