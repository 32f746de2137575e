"""SMoE-Dropout (Chen et al. 2023, arXiv:2303.01610): a random frozen router and a growing number of experts.

python -m moejax.main --config=configs/mechanisms/smoe_dropout.py --workdir=/tmp/moejax_smoe_dropout

The router kernel is randomly initialised and never trained (``router.frozen``). Every routed layer's k follows
``moejax.routing.smoe_dropout_k``: from ``train.moe_k_start = 1`` to ``train.moe_k_end = 8`` (all experts) in equal
shares of the steps; the trainer jits one step per distinct k. Evaluation uses all 8 (``train.eval_moe_k``); any
other k can be evaluated from the checkpoint with ``moejax.training.loop.evaluate_at_k(config, workdir, ks)``
("self-slimmable"). The selected weights are renormalised so that the output scale does not depend on k (our
choice). Dropless dispatch: no capacity to re-tune as k changes.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    # A frozen router cannot be balanced by a loss, and its z-loss has no gradient: both off.
    layer = {"num_experts": 8, "hidden_dim": 64, "dispatch": {"mode": "dropless"},
             "router": {"k": 1, "frozen": True, "renormalize": True, "load_balance_weight": 0.0, "z_loss_weight": 0.0}}
    config = digits_mlp_config([layer, dict(layer)])
    config.train.moe_k_start = 1
    config.train.moe_k_end = 8
    config.train.eval_moe_k = 8
    return config
