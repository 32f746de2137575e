"""MoQE (Kim, Fahim, Awadalla 2023): weight-only quantization of an MoE LM's experts vs a dense LM's FFNs.

python -m moejax.main --config=experiments/moqe/config.py:full,moe --workdir=/tmp/moqe
python experiments/moqe/run.py --preset=full --threads=1          # the sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets (all: a byte-level pre-norm Transformer LM on the offline ``stdlib_bytes`` corpus, GELU MLP FFNs without
biases, rotary attention, tied embeddings)
  ``tiny``  the smoke test (seconds): D=16, 2 blocks, 4 experts of width 8, 6 steps (capacity dispatch with
            C = T, the same computation as dropless, which compiles faster).
  ``pilot`` ``full``'s models trained for 600 steps, ``moe`` and ``dense`` only, 2 seeds (README, "Pilot";
            written to ``pilot/``).
  ``full``  the README table: D=64, 4 blocks, 4 heads, L=128, batch 16, 1500 steps; the MoE has an
            ``E=8``, top-2 MoE FFN in every other block (blocks 1 and 3, ``moe_every=2``) with experts of width
            ``F=64``; the other blocks have dense FFNs of width ``2F = 128``.
variants
  ``moe``         the MoE LM above.
  ``dense``       the same LM with every FFN dense of width ``2F``: the same active compute per token as ``moe``
                  (top-2 of width-F experts = one width-2F FFN), the paper's "FLOPs equivalent dense model".
  ``dense_wide``  every FFN dense of width ``F (1 + E/2)`` (320 in ``full``): the same total FFN parameters as
                  ``moe`` (2 dense blocks of 2F + 2 MoE blocks of E experts of F = 4 blocks of F (1 + E/2)),
                  i.e. "same total parameters", a secondary comparison the paper does not make.

The MoE routes with a learned softmax top-2 router whose two weights are renormalised to sum to one, Switch
load-balance loss 0.01 and router z-loss 0.001 (the library's defaults), dropless dispatch (no token dropped,
so quantization is the only thing that changes between evaluations). Every variant trains with the same
optimiser, schedule, steps and data order for a given seed.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "full", "pilot")
VARIANTS = ("moe", "dense", "dense_wide")
SEEDS = {"tiny": (0,), "full": (0, 1, 2, 3, 4), "pilot": (0, 1)}
PILOT_VARIANTS = ("moe", "dense")
BITS = (8, 4, 3, 2)
SIZES = {
    "tiny": dict(d=16, layers=2, heads=2, experts=4, f=8, seq=32, batch=8, steps=6, eval_steps=2),
    "full": dict(d=64, layers=4, heads=4, experts=8, f=64, seq=128, batch=16, steps=1500, eval_steps=16),
}
SIZES["pilot"] = dict(SIZES["full"], steps=600)    # fewer steps: the pilot asks "can it discriminate?"
K = 2
MOE_EVERY = 2


def moe_blocks(num_layers: int) -> list[int]:
    """The blocks with an MoE FFN (``model.moe_every = MOE_EVERY``): 1 and 3 of 4."""
    return [i for i in range(num_layers) if (i + 1) % MOE_EVERY == 0]


def dense_width(variant: str, size: dict) -> int:
    """The hidden width of the dense FFN blocks of ``variant`` (``2F`` except ``dense_wide``)."""
    if variant == "dense_wide":
        # Total FFN parameters of the MoE: (L/2) blocks of width K F plus (L/2) blocks of E experts of width F.
        # Spread over L dense blocks: F (K + E) / 2 each; with K = 2 this is F (1 + E/2).
        return size["f"] * (K + size["experts"]) // 2
    return K * size["f"]


def moe_spec(variant: str, size: dict) -> dict | None:
    """The ``model.moe`` mapping of ``variant`` (None for the dense variants)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    if variant != "moe":
        return None
    return {"num_experts": size["experts"], "hidden_dim": size["f"], "expert_kind": "mlp", "activation": "gelu",
            "use_bias": False, "router": {"k": K, "renormalize": True}, "dispatch": {"mode": "dropless"}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or "moe"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    size = SIZES[preset]
    moe = moe_spec(variant, size)
    if moe is not None and preset == "tiny":   # C = T: dropless's computation, compiled faster on CPU
        moe["dispatch"] = {"mode": "capacity", "capacity_impl": "index", "capacity_factor": None,
                           "eval_capacity_factor": None}
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": size["batch"],
                                             "eval_batch_size": size["batch"], "seq_len": size["seq"], "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": MOE_EVERY, "ffn_kind": "mlp", "activation": "gelu", "use_bias": False,
        "dense_hidden_dim": dense_width(variant, size)})
    config.model.moe = moe
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, eval_steps=size["eval_steps"],
                                load_balance_weight=0.01 if moe else 0.0, z_loss_weight=0.001 if moe else 0.0)
    return config
