"""A small byte-level MoE Transformer LM on the offline stdlib corpus (no network).

python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/moejax_lm

MoE FFN in every block (8 experts, top-2, one shared expert), dropless dispatch; ``--config.model.moe=None``
gives the dense baseline.
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
        "kind": "transformer_lm",
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "moe_every": 1,
        "moe": {
            "num_experts": 8, "hidden_dim": 64, "expert_kind": "glu", "activation": "silu", "use_bias": False,
            "num_shared_experts": 1,
            "router": {"k": 2, "renormalize": True},
            "dispatch": {"mode": "dropless"},
        },
    })
    config.optimizer = optimizer_config(**{"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine",
                                      "warmup_steps": 100, "weight_decay": 0.01, "grad_clip_norm": 1.0})
    config.train = train_config(**{"steps": 2000, "log_every": 100, "eval_every": 500, "eval_steps": 20,
                                              "checkpoint_every": 500, "keep_checkpoints": 2})
    config.mesh = mesh_config()        # all devices on 'data'; e.g. --config.mesh.expert=4
    return config
