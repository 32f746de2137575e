"""Hash routing (Roller et al. 2021, arXiv:2106.04426): a fixed random hash picks each token's expert.

python -m moejax.main --config=configs/mechanisms/hash.py --workdir=/tmp/moejax_hash

No router is learned; top-1 with weight 1, as in the paper. The MLP classifier has no token ids, so the
router hashes each example's position in its batch (``MoELayer`` without ``token_ids``): a fixed
pseudo-random assignment at the level of examples, a baseline, not the paper's token-id hash. For that, see
``configs/mechanisms/hash_lm.py``: the Transformer LM passes its input token ids to its hash layers. The
load-balancing loss has nothing to act on.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    # No learned router: its load-balance and z-losses would be constants, so they are off.
    router = {"kind": "hash", "k": 1, "seed": 0, "load_balance_weight": 0.0, "z_loss_weight": 0.0}
    layer = {"num_experts": 8, "hidden_dim": 64, "router": router, "dispatch": {"mode": "dropless"}}
    return digits_mlp_config([layer, {**layer, "router": {**router, "seed": 1}}])
