"""Hash layers in a language model (Roller et al. 2021, arXiv:2106.04426): each token id picks its expert.

python -m moejax.main --config=configs/mechanisms/hash_lm.py --workdir=/tmp/moejax_hash_lm

The paper's setting: the Transformer LM hands its input token ids to every MoE FFN
(``moejax.models.blocks.apply_ffn``), and ``router.kind='hash'`` sends every occurrence of a token id to the
same expert, at every position and in every sequence, through a fixed random hash of the id decided before
training. Top-1 with weight 1 (no gate) and no learned router, as in the paper; both MoE blocks use the same
spec (``model.moe``), hence the same hash (the same ids meet in each block, each block with its own experts).
Here the tokens are bytes (vocabulary 256), so each of the 8 experts owns about 32 byte values, and byte
frequencies make the expert loads uneven: the paper's frequency-balanced hash needs corpus statistics and is
not implemented. Auxiliary losses are off: there is no router for them to train.

A small byte-level LM on the offline ``stdlib_bytes`` corpus (no network), the model of ``configs/lm_tiny.py``
with hash-routed experts instead of learned top-2 plus a shared expert, 300 steps; see
docs/routing_mechanisms.md. ``configs/mechanisms/hash.py`` is the MLP classifier, which has no token ids.
"""
import ml_collections
from ml_collections import config_dict

from moejax.training.config import mesh_config, optimizer_config, train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": 16, "eval_batch_size": 16,
                                             "seq_len": 128, "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": 64, "num_layers": 2, "num_heads": 4, "moe_every": 1,
        "moe": {"num_experts": 8, "hidden_dim": 64, "expert_kind": "glu", "activation": "silu", "use_bias": False,
                "router": {"kind": "hash", "k": 1, "seed": 0, "load_balance_weight": 0.0, "z_loss_weight": 0.0},
                "dispatch": {"mode": "dropless"}},
    })
    config.optimizer = optimizer_config(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=30, weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=300, log_every=50, eval_every=150, eval_steps=10, checkpoint_every=150,
                                keep_checkpoints=1)
    config.mesh = mesh_config()
    return config
