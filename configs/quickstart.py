"""Quickstart: an MoE MLP classifier on scikit-learn's bundled digits (no network, ~1 minute on 2 CPU cores).

python -m moejax.main --config=configs/quickstart.py --workdir=/tmp/moejax_quickstart

Two MoE layers with their own expert counts (8 experts top-2, then 4 experts top-1) between a dense
projection and the classifier head; dropless dispatch.
"""
import ml_collections
from ml_collections import config_dict

from moejax.training.config import mesh_config, optimizer_config, train_config


def moe_layer(num_experts: int, k: int, hidden_dim: int) -> dict:
    return {
        "num_experts": num_experts,
        "hidden_dim": hidden_dim,
        "expert_kind": "mlp",
        "activation": "gelu",
        "router": {"k": k, "renormalize": k > 1, "load_balance_weight": 0.01, "z_loss_weight": 0.001},
        "dispatch": {"mode": "dropless"},
    }


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "digits", "batch_size": 64, "eval_batch_size": 360,
                                             "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "mlp",
        "d_model": 64,
        "layers": [moe_layer(8, 2, 128), moe_layer(4, 1, 128)],
        "residual": True,
        "norm": "layernorm",
    })
    config.optimizer = optimizer_config(**{"name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine",
                                      "warmup_steps": 50, "weight_decay": 1e-4, "grad_clip_norm": 1.0})
    config.train = train_config(**{
        "steps": 1500,
        "log_every": 100,
        "eval_every": 500,
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
    })
    config.mesh = mesh_config()        # all devices on 'data'; e.g. --config.mesh.expert=4
    return config
