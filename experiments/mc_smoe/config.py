"""MC-SMoE (Li et al. 2024, *Merge, Then Compress*): merge a trained 16-expert LM's experts to 8 and 4 per layer,
then compress them; M-SMoE against averaging, frequency weighting without alignment and pruning.

python -m moejax.main --config=experiments/mc_smoe/config.py:full --workdir=/tmp/mc_smoe    # the model only
python experiments/mc_smoe/run.py --preset=full --threads=1      # training + surgery sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"`` (one variant, ``smoe16``, the trained model;
every merge and compression is surgery on its checkpoint, set by :func:`surgery_settings`, which the trainer's
config cannot hold):

presets (a byte-level pre-norm Transformer LM on the offline ``stdlib_bytes`` corpus; every FFN an MoE layer of
GELU MLP experts without biases, a learned softmax top-2 router with renormalised weights, Switch load-balance
loss 0.01, router z-loss 0.001, dropless dispatch)
  ``tiny``  the smoke test (seconds): D=16, 1 block, 4 experts of width 8, 6 steps; merges to 2 experts, one
            compression rank, no fine-tuning (``tests/test_experiments.py`` tests it on its own); capacity
            dispatch with C = T, the same computation as dropless, which compiles faster.
  ``full``  the README table: D=64, 2 blocks, 4 heads, L=128, batch 16, ``E=16`` experts of width ``F=128``
            (the experts hold 91% of the parameters, as the experts dominate switch-base-32), top-2.
  ``pilot`` ``full``'s model, 600 training steps, one seed, a smaller surgery grid (one compression rank, 60
            fine-tuning steps): the README's "Pilot" section, written to ``pilot/``.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "full", "pilot")
VARIANTS = ("smoe16",)
SEEDS = {"tiny": (0,), "full": (0, 1, 2, 3, 4), "pilot": (0,)}
SIZES = {
    "tiny": dict(d=16, layers=1, heads=2, experts=4, f=8, seq=32, batch=8, steps=6, eval_steps=2),
    "full": dict(d=64, layers=2, heads=4, experts=16, f=128, seq=128, batch=16, steps=1500, eval_steps=16),
}
SIZES["pilot"] = dict(SIZES["full"], steps=600)    # fewer steps: the pilot asks "can it discriminate?"
K = 2
# Merge methods of moejax.surgery.merge.merge_layer. "msmoe", "frequency", "average" are evaluated with the
# paper's router ("bound": the E router outputs kept, each member's slot served by its group's merged expert);
# "prune" keeps the G dominant experts and drops the router columns of the others (tokens choose among the
# survivors: conventional expert pruning). Every method is also evaluated, without fine-tuning, in the other form.
METHODS = ("msmoe", "frequency", "average", "prune")
COMPRESSIONS = ("low_rank", "shared_basis")


def surgery_settings(preset: str) -> dict:
    """What run.py does to each trained model (the README's grid), per preset.

    groups: experts per layer after merging; calib_batches: training batches for routing frequencies and router-
    logit similarities (the authors' code uses 256 training sequences); finetune: the short post-merge fine-tune
    (``steps`` AdamW steps on the training stream after the end of training, router frozen, KD from the unmerged
    model with ``kd_lambda`` at temperature ``kd_temperature`` as in the authors' code), applied to ``finetune_
    methods`` and to every compression; ranks: of the compressions of the fine-tuned M-SMoE model.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    if preset == "tiny":
        return dict(groups=(2,), calib_batches=2, ranks=(2,), compressions=("low_rank",),
                    finetune=dict(steps=0, learning_rate=5e-4, warmup_steps=1, kd_lambda=0.2, kd_temperature=2.0),
                    finetune_methods=(), finetune_compressed=False)
    return dict(groups=(8, 4), calib_batches=16, ranks=(32, 16, 8) if preset == "full" else (16,),
                compressions=COMPRESSIONS,
                finetune=dict(steps=150 if preset == "full" else 60, learning_rate=5e-4, warmup_steps=10,
                              kd_lambda=0.2, kd_temperature=2.0),
                finetune_methods=METHODS, finetune_compressed=True)


def moe_spec(size: dict) -> dict:
    return {"num_experts": size["experts"], "hidden_dim": size["f"], "expert_kind": "mlp", "activation": "gelu",
            "use_bias": False, "router": {"k": K, "renormalize": True}, "dispatch": {"mode": "dropless"}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or VARIANTS[0]
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    size = SIZES[preset]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": size["batch"],
                                             "eval_batch_size": size["batch"], "seq_len": size["seq"], "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": 1, "ffn_kind": "mlp", "activation": "gelu", "use_bias": False})
    config.model.moe = moe_spec(size)
    if preset == "tiny":   # C = T: the same no-drop computation as dropless, and it compiles faster on CPU
        config.model.moe.dispatch = {"mode": "capacity", "capacity_impl": "index", "capacity_factor": None,
                                     "eval_capacity_factor": None}
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, eval_steps=size["eval_steps"],
                                load_balance_weight=0.01, z_loss_weight=0.001)
    return config
