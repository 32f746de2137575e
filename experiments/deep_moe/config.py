"""Deep mixture of experts (Eigen, Ranzato, Sutskever 2013) on translated digits: where/what experts.

python -m moejax.main --config=experiments/deep_moe/config.py:full --workdir=/tmp/deep_moe
python experiments/deep_moe/run.py --preset=full          # the sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets
  ``tiny``   a few steps of a narrow model (the smoke test, seconds).
  ``full``   the README table: D=64, two MoE layers of 4 experts of width 64, 3000 steps of batch 128
             (about a minute per run on one CPU core).
  ``mnist``  ``full``'s model on the TFDS ``mnist`` dataset (needs a network). moejax has no translation
             transform for named TFDS datasets, so this trains on *untranslated*, centred 28x28 MNIST and has
             no position labels: it does not test the "where" half of the claim (see README.md).
variants (the routing of both MoE layers)
  ``dense``  the paper's mixture: every expert weighted by a softmax gate (``router.k = num_experts``).
  ``top2``, ``top1``  sparse top-k routing with the same experts (``top2`` renormalises its two gates).

The model is ``model.kind='mlp'`` with ``residual=False, norm=None``: input projection (linear) ->
MoE layer 1 -> MoE layer 2 -> linear head; each example is one token. Each expert is an ``mlp`` FFN
``relu(x W_in + b) W_out + b`` of width 64. The first gate is therefore linear in the pixels (through the
linear input projection), as the paper's first gating network is.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "full", "mnist")
VARIANTS = ("dense", "top2", "top1")
SEEDS = {"tiny": (0,), "full": (0, 1, 2, 3, 4), "mnist": (0, 1, 2, 3, 4)}


def moe_layer(num_experts: int, hidden_dim: int, k: int) -> dict:
    return {"num_experts": num_experts, "hidden_dim": hidden_dim, "expert_kind": "mlp", "activation": "relu",
            "use_bias": True, "router": {"k": k, "renormalize": 1 < k < num_experts},
            "dispatch": {"mode": "dropless"}}


def _k(variant: str, num_experts: int) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    return {"dense": num_experts, "top2": 2, "top1": 1}[variant]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or "dense"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    tiny = preset == "tiny"
    experts, width, d_model = (4, 16, 16) if tiny else (4, 64, 64)
    k = _k(variant, experts)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({
        "name": "mnist" if preset == "mnist" else "translated_digits",
        "batch_size": 64 if tiny else 128, "eval_batch_size": 480 if tiny else 720, "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "mlp", "d_model": d_model, "residual": False, "norm": None,
        "layers": [moe_layer(experts, width, k), moe_layer(experts, width, k)],
    })
    steps = 20 if tiny else 3000
    config.optimizer = optimizer_config(name="adam", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=5 if tiny else 100, grad_clip_norm=1.0)
    # The paper constrains the gates to spread assignments over experts; here the same job is done by the
    # importance (CV^2 of per-expert gate mass) loss, which, unlike the Switch load loss, is not constant
    # for dense mixtures. One checkpoint at the end: run.py restores it for the gating analysis.
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, load_balance_weight=0.01, z_loss_weight=0.001,
                                importance_weight=0.1)
    return config
