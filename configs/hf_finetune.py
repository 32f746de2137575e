"""Fine-tuning a pretrained architecture, for ``python -m moejax.aot --hf=<name>``: the batch, sequence length,
optimiser and mesh (the model comes from ``--hf``; data is never read, only its shape).

python -m moejax.aot --config=configs/hf_finetune.py --hf=mixtral_8x7b --target=tpu:v5p:4x4x2 \\
    --config.mesh.expert=8 --config.mesh.fsdp=4 --config.mesh.data=1

The table of pretrained architectures, their targets and commands is in docs/accelerator.md.
"""
import ml_collections

from moejax.training.config import mesh_config, optimizer_config, train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Token ids up to the model's vocabulary; only the shape [batch_size, seq_len + 1] is used.
    config.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": 8, "eval_batch_size": 8,
                                             "seq_len": 4096, "seed": 0})
    config.model = ml_collections.ConfigDict({"kind": "transformer_lm"})     # replaced by --hf
    config.optimizer = optimizer_config(**{"name": "adamw", "learning_rate": 1e-5, "schedule": "warmup_cosine",
                                           "warmup_steps": 100, "weight_decay": 0.0, "grad_clip_norm": 1.0})
    config.train = train_config(**{"steps": 1000})
    config.mesh = mesh_config()
    return config
