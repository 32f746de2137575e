"""A small ViT with MoE FFNs on the translated-digits canvas (24x24, offline).

python -m moejax.main --config=configs/vit_tiny.py --workdir=/tmp/moejax_vit
"""
import ml_collections
from ml_collections import config_dict

from moejax.training.config import mesh_config, optimizer_config, train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "translated_digits", "batch_size": 64, "eval_batch_size": 240,
                                             "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "vit",
        "patch_size": 4,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "moe_every": 1,
        "pooling": "mean",
        "moe": {
            "num_experts": 4, "hidden_dim": 64, "router": {"k": 1},
            "dispatch": {"mode": "capacity", "capacity_factor": 1.25, "eval_capacity_factor": 2.0},
        },
    })
    config.optimizer = optimizer_config(**{"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine",
                                      "warmup_steps": 100, "weight_decay": 1e-4, "grad_clip_norm": 1.0})
    config.train = train_config(**{"steps": 2000, "log_every": 100, "eval_every": 500,
                                              "checkpoint_every": 500, "keep_checkpoints": 2})
    config.mesh = mesh_config()        # all devices on 'data'; e.g. --config.mesh.expert=4
    return config
