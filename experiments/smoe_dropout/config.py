"""SMoE-Dropout (Chen et al. 2023) on a byte-level LM: a frozen random router, k growing during training.

python -m moejax.main --config=experiments/smoe_dropout/config.py:full,smoe_dropout --workdir=/tmp/smoe
python experiments/smoe_dropout/run.py --preset=full          # the sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets
  ``tiny``   a few steps of a 1-block model with 2 experts (the smoke test, seconds).
  ``full``   the README table: byte-level Transformer LM on ``stdlib_bytes``, D=64, 2 blocks, 4 heads, L=128,
             batch 8; the FFN of every block is E=8 experts of width F=32 (``mlp``, GELU, no biases), i.e. the
             block's standard 4D-wide MLP (E F = 256 = 4 D) split evenly into 8 experts, as the paper
             "modularises" a dense MLP. Steps chosen so that the whole sweep fits ~45 minutes on one contended
             CPU core (see README.md).
  ``overfit`` claim (b)'s registered regime (README "Claim (b) where the models over-fit"): ``full``'s models
             and variants trained on a small corpus, ``stdlib_bytes[train[:1%]]`` (7 files, 41,902 bytes), for
             OVERFIT_STEPS steps of 8 x 128 bytes (about 24 passes over it), 5 seeds; the validation batches are
             ``full``'s. run.py also scores each final model on the training bytes (the generalisation gap).
  ``lm1b``   ``full``'s variants at a larger size (D=256, 4 blocks, 8 heads, E=16 experts of width 64, so
             E F = 4 D, L=256, batch 32, 20000 steps) on the TFDS ``lm1b`` dataset read as bytes, for a machine
             with a network and an accelerator (never run here).
variants
  ``smoe_dropout``   the paper's method: ``router.frozen=True`` (a random router kernel, never trained) and the
                     trainer's k schedule ``train.moe_k_start=1 -> train.moe_k_end=E`` (each k for an equal share
                     of the steps, :func:`moejax.routing.smoe_dropout_k`); evaluated with all E experts.
  ``learned_top2``   the "learnable SMoE" baseline: a trained top-2 router (load-balancing loss 0.01, router
                     z-loss 0.001), k=2 throughout training and in its own evaluation.
  ``dense``          no MoE: a dense MLP of width E F in every block, the same parameters as the MoE models
                     (minus the D x E router), all active: the paper's "dense training" baseline.
  ``dense_dropout``  ``dense`` with standard dropout 0.1 on the attention and FFN outputs (the paper also
                     compares with a densely trained model with dropout).
  ``frozen_top2``    ablation: the frozen random router of ``smoe_dropout`` trained at a fixed k=2, without the
                     k schedule: separates the effect of the curriculum from that of the random router.

Every MoE variant renormalises the selected gate weights to sum to one (our choice, also in
``configs/mechanisms/smoe_dropout.py``): the FFN output scale then does not depend on the inference k, for the
learned router as well as the random one. Dispatch is dropless, so no capacity has to follow k. The MoE
variants have no dropout (SMoE-Dropout is the regulariser under test).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "full", "overfit", "lm1b")
VARIANTS = ("smoe_dropout", "learned_top2", "dense", "dense_dropout", "frozen_top2")
MOE_VARIANTS = ("smoe_dropout", "learned_top2", "frozen_top2")
SEEDS = {"tiny": (0,), "full": (0, 1, 2), "overfit": (0, 1, 2, 3, 4), "lm1b": (0, 1, 2)}
REFUSE_DIRTY = ("full", "overfit")     # registered presets: run only from a committed tree
TRAIN_SPLIT = {"overfit": "train[:1%]"}   # default: the whole training split
FIT_PRESETS = ("overfit",)             # presets whose runs are also scored on their training bytes
OVERFIT_STEPS = 1000
SIZES = {
    "tiny": dict(d=32, layers=1, heads=2, experts=2, f=16, seq=32, batch=8, steps=8, eval_steps=2),
    "full": dict(d=64, layers=2, heads=4, experts=8, f=32, seq=128, batch=8, steps=1000, eval_steps=20),
    "overfit": dict(d=64, layers=2, heads=4, experts=8, f=32, seq=128, batch=8, steps=OVERFIT_STEPS, eval_steps=20),
    "lm1b": dict(d=256, layers=4, heads=8, experts=16, f=64, seq=256, batch=32, steps=20000, eval_steps=50),
}
DROPOUT = 0.1  # of dense_dropout: the usual Transformer rate


def moe_spec(variant: str, num_experts: int, hidden_dim: int) -> dict | None:
    """The ``model.moe`` mapping of ``variant`` (None for the dense variants)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    if variant not in MOE_VARIANTS:
        return None
    frozen = variant != "learned_top2"
    k = 1 if variant == "smoe_dropout" else 2  # smoe_dropout's k is set per step by the trainer's schedule
    return {"num_experts": num_experts, "hidden_dim": hidden_dim, "expert_kind": "mlp", "activation": "gelu",
            "use_bias": False, "router": {"k": k, "frozen": frozen, "renormalize": True},
            "dispatch": {"mode": "dropless"}}


def inference_ks(num_experts: int) -> tuple[int, ...]:
    """Every inference k from 1 to E: the self-slimmable sweep (the table shows 1, 2, 4, ..., E)."""
    return tuple(range(1, num_experts + 1))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or "smoe_dropout"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    size = SIZES[preset]
    experts = size["experts"]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({
        "name": "lm1b" if preset == "lm1b" else "stdlib_bytes", "batch_size": size["batch"],
        "eval_batch_size": 2 * size["batch"], "seq_len": size["seq"], "seed": 0,
        "train_split": TRAIN_SPLIT.get(preset, "train")})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": 1, "ffn_kind": "mlp", "activation": "gelu", "use_bias": False,
        "dense_hidden_dim": experts * size["f"],  # used only by dense blocks, i.e. by the dense variants
        "dropout_rate": DROPOUT if variant == "dense_dropout" else 0.0,
    })
    config.model.moe = moe_spec(variant, experts, size["f"])
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    learned = variant == "learned_top2"
    # A frozen router cannot be balanced by a loss and its z-loss has no gradient: both off for it.
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, eval_steps=size["eval_steps"],
                                load_balance_weight=0.01 if learned else 0.0,
                                z_loss_weight=0.001 if learned else 0.0)
    if variant == "smoe_dropout":
        config.train.moe_k_start = 1
        config.train.moe_k_end = experts
        config.train.eval_moe_k = experts
    return config
