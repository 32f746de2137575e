"""Top-p ("dynamic") routing vs top-2 (Huang et al. 2024) on a byte mixture with known per-byte difficulty.

python -m moejax.main --config=experiments/top_p_routing/config.py:full,top_p40 --workdir=/tmp/top_p
python experiments/top_p_routing/run.py --preset=full --threads=1          # the sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets (all: a byte-level pre-norm Transformer LM, GELU MLP experts without biases, rotary attention, tied
embeddings, an MoE FFN in every block; data: ``mixture.py``'s copy / addition / library-text documents, read
through moejax's data layer as the TFDS dataset ``top_p_routing_mixture``)
  ``tiny``   the smoke test (seconds): D=16, 2 blocks, 4 experts of width 8, 6 steps, capacity dispatch with
             C = T (dropless's computation, compiled faster on CPU).
  ``pilot``  ``full``'s models, 2 seeds, fewer steps (README, "Pilot"; written to ``pilot/``).
  ``full``   the README table: D=64, 4 blocks, 4 heads, L=128, batch 16, :data:`FULL_STEPS` steps, E=8 experts of
             width F=64 in every block.
variants (identical except the routing rule and the router-entropy loss that is part of the top-p method)
  ``top2``      learned softmax router, top-2, weights = the two raw softmax probabilities (not renormalised).
  ``top_p40``   top-p with threshold p = 0.4 (the authors' released default ``top_p_threshold=0.4``): the fewest
                experts, by descending probability, whose probabilities reach 0.4; weights = their raw softmax
                probabilities (as in the authors' ``SwitchMLP``); no cap below E (``router.k = E``, the authors'
                code has none); plus the dynamic (router-entropy) loss with weight :data:`ENTROPY_WEIGHT`.
  ``top_p60``   the same with p = 0.6 (a second threshold, closer to top-2's budget: our choice).

All variants: Switch load-balance loss 0.01 and router z-loss 0.001 (the library's defaults), dropless dispatch,
AdamW 2e-3 warmup-cosine, the same data order and initialisation for a given seed.
"""
from __future__ import annotations

import ml_collections

from moejax import sweep
from moejax.training.config import optimizer_config, train_config

mixture = sweep.load_sibling(__file__, "top_p_routing", "mixture")   # registers the TFDS builder once

PRESETS = ("tiny", "pilot", "full")
VARIANTS = ("top2", "top_p40", "top_p60")
TOP_P = {"top_p40": 0.4, "top_p60": 0.6}
PRIMARY = "top_p40"          # the variant that decides the claims; top_p60 is reported beside it
SEEDS = {"tiny": (0,), "pilot": (0, 1), "full": (0, 1, 2, 3, 4)}
FULL_STEPS = 1500
ENTROPY_WEIGHT = 0.001       # the dynamic loss's weight: our choice (the paper's value could not be read)
SIZES = {
    "tiny": dict(d=16, layers=2, heads=2, experts=4, f=8, seq=32, batch=8, steps=6, eval_windows=8),
    "full": dict(d=64, layers=4, heads=4, experts=8, f=64, seq=128, batch=16, steps=FULL_STEPS, eval_windows=256),
}
SIZES["pilot"] = dict(SIZES["full"], steps=FULL_STEPS)
TOP2_K = 2
TOP_P_CAP = 4               # at most 4 of the 8 experts (the authors' code has no cap): our choice, see README


def router_spec(variant: str, num_experts: int) -> dict:
    """The ``model.moe.router`` mapping of ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    if variant == "top2":
        return {"kind": "topk", "k": TOP2_K, "renormalize": False}
    return {"kind": "top_p", "top_p": TOP_P[variant], "k": TOP_P_CAP, "renormalize": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or PRIMARY
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    size = SIZES[preset]
    moe = {"num_experts": size["experts"], "hidden_dim": size["f"], "expert_kind": "mlp", "activation": "gelu",
           "use_bias": False, "router": router_spec(variant, size["experts"]), "dispatch": {"mode": "dropless"}}
    if preset == "tiny":   # C = T: dropless's computation, compiled faster on CPU
        moe["dispatch"] = {"mode": "capacity", "capacity_impl": "index", "capacity_factor": None,
                           "eval_capacity_factor": None}
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({
        "name": mixture.DATASET_NAME, "task": "lm", "text_key": "text", "eval_split": "validation",
        "batch_size": size["batch"], "eval_batch_size": size["batch"], "seq_len": size["seq"], "seed": 0,
        "data_dir": mixture.data_dir()})
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": 1, "ffn_kind": "mlp", "activation": "gelu", "use_bias": False})
    config.model.moe = moe
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, eval_steps=4, load_balance_weight=0.01, z_loss_weight=0.001,
                                router_entropy_weight=0.0 if variant == "top2" else ENTROPY_WEIGHT)
    return config
