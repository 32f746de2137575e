"""Yuan 2.0-M32's attention router (Wu et al. 2024) with top-2 softmax routing.

python -m moejax.main --config=configs/mechanisms/attention_router.py --workdir=/tmp/moejax_attention_router
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64, "router": {"k": 2, "renormalize": True, "scorer": "attention"},
             "dispatch": {"mode": "dropless"}}
    return digits_mlp_config([layer, dict(layer)], steps=300)
