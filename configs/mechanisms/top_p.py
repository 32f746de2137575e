"""Dynamic top-p routing with the router-entropy ("dynamic") loss (Huang et al. 2024, arXiv:2403.07652).

python -m moejax.main --config=configs/mechanisms/top_p.py --workdir=/tmp/moejax_top_p

Each token takes the fewest experts, by descending router probability, whose probability reaches
``top_p = 0.4`` (the authors' released default), at most ``k = 4`` of the 8. Each router adds its
``router_entropy_weight * router entropy`` (the ``router_entropy`` loss plug-in): minimising it concentrates
the router's mass so that easy tokens need fewer experts. The weight 1e-3 is our choice for this small model.
Watch ``experts_per_token`` in metrics.jsonl.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64, "dispatch": {"mode": "dropless"},
             "router": {"kind": "top_p", "top_p": 0.4, "k": 4, "router_entropy_weight": 1e-3}}
    return digits_mlp_config([layer, dict(layer)])
