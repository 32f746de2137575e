"""THOR (Zuo et al. 2022, arXiv:2110.04260): stochastic experts plus a consistency regulariser.

python -m moejax.main --config=configs/mechanisms/thor.py --workdir=/tmp/moejax_thor

Every token goes to one uniformly random expert (``router.kind='random'``, no router, no gate), in training and
in evaluation. Each train step runs the model twice under different RNG keys (two random routings) and
minimises ``CE_a + CE_b + train.consistency_weight * 1/2 (KL(p_a||p_b) + KL(p_b||p_a))``, the paper's objective
(the two cross-entropies summed). The paper's weight is tuned per task; 1.0 (their code's default) here.
Evaluation without a ``'jitter'`` RNG uses a fixed draw from ``router.seed``, so it is reproducible.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    router = {"kind": "random", "k": 1, "seed": 0, "load_balance_weight": 0.0, "z_loss_weight": 0.0}
    layer = {"num_experts": 4, "hidden_dim": 64, "router": router, "dispatch": {"mode": "dropless"}}
    config = digits_mlp_config([layer, {**layer, "router": {**router, "seed": 1}}])
    config.train.consistency_weight = 1.0
    return config
