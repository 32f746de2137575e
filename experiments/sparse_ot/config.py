"""Sparsity-constrained OT (Liu, Puigcerver, Blondel 2023): the solver study (part A) and the router (part B).

python experiments/sparse_ot/run.py --preset=full --threads=1          # both parts, the sweep behind README.md
python -m moejax.main --config=experiments/sparse_ot/config.py:full,ksparse_ot --workdir=/tmp/sparse_ot

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``, is part B's trainer config; part A's settings
are the constants ``SOLVER[preset]``.

Part A (no training; :mod:`synthetic`): instance families ``assign`` (k = 1 limit), ``square`` (k >= M limit and
the primary convergence study) and ``moe`` (the router's problem), each over the k grid ``K_GRID[family]`` at the
family's fixed gamma, with accelerated gradient ascent (primary) and L-BFGS (secondary, ``square`` only).

Part B presets (a byte-level pre-norm Transformer LM on the offline ``stdlib_bytes`` corpus, GELU experts, rotary
attention, tied embeddings; one MoE block of two, ``moe_every=2``):
  ``tiny``  the smoke test: D=16, 4 experts of width 8, 4 steps.
  ``pilot`` ``full``'s model, 200 steps, 2 seeds (README, "Pilot").
  ``full``  D=32, 2 blocks, 2 heads, L=64, batch 8 (T = 512 routed tokens per step), E=8 experts of width 32,
            k=2, 600 steps, 10 seeds (5 before the pilot; README, "Pilot").
variants (all: renormalised top-2 combine weights from the softmax scores, Switch load-balance loss 0.01, z-loss
0.001, capacity dispatch with capacity factor 1.0 in training, ``C = ceil(T k / E) = 128``, no capacity limit in
evaluation where every variant routes by greedy top-k of its scores)
  ``topk``        the learned top-2 router (tokens over capacity are dropped).
  ``sinkhorn``    S-BASE: top-2 of a 20-iteration Sinkhorn plan in training.
  ``ksparse_ot``  top-2 of the k-sparse OT plan with at most ``C`` tokens per expert (``ot_tokens_per_expert`` =
                  the capacity), gamma = 1, at most 100 accelerated-gradient iterations, tolerance 1e-3.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "pilot", "full")
VARIANTS = ("topk", "sinkhorn", "ksparse_ot")
SEEDS = {"tiny": (0,), "pilot": (0, 1), "full": tuple(range(10))}   # full: 10 seeds, set after the pilot
SIZES = {
    "tiny": dict(d=16, layers=2, heads=2, experts=4, f=8, seq=16, batch=8, steps=4, eval_steps=1),
    "full": dict(d=32, layers=2, heads=2, experts=8, f=32, seq=64, batch=8, steps=600, eval_steps=16),
}
SIZES["pilot"] = dict(SIZES["full"], steps=200)
K = 2
CAPACITY_FACTOR = 1.0

# ----------------------------------------------------------------------------------- part A: the solver study
K_GRID = {"assign": (1, 2, 8), "square": (1, 2, 4, 8, 16), "moe": (8, 12, 16, 32, 64)}
SOLVER = {
    "tiny": dict(instances=2, max_iter=200, budget=20, long=300, tol=1e-4, lbfgs=False, families=("assign",),
                 k_grid={"assign": (1, 8)}),
    "pilot": dict(instances=10, max_iter=3000, budget=100, long=5000, tol=1e-4, lbfgs=True,
                  families=("assign", "square", "moe")),
    "full": dict(instances=50, max_iter=3000, budget=100, long=5000, tol=1e-4, lbfgs=True,
                 families=("assign", "square", "moe")),
}


def router_spec(variant: str) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    common = {"k": K, "renormalize": True}
    if variant == "topk":
        return {"kind": "topk", **common}
    if variant == "sinkhorn":
        return {"kind": "sinkhorn", "balance_iterations": 20, **common}
    return {"kind": "ksparse_ot", "ot_gamma": 1.0, "ot_max_iterations": 100, "ot_tolerance": 1e-3, **common}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or "ksparse_ot"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    size = SIZES[preset]
    moe = {"num_experts": size["experts"], "hidden_dim": size["f"], "expert_kind": "mlp", "activation": "gelu",
           "use_bias": False, "router": router_spec(variant),
           "dispatch": {"mode": "capacity", "capacity_impl": "index", "capacity_factor": CAPACITY_FACTOR,
                        "eval_capacity_factor": None}}
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": size["batch"],
                                             "eval_batch_size": size["batch"], "seq_len": size["seq"], "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": 2, "ffn_kind": "mlp", "activation": "gelu", "use_bias": False,
        "dense_hidden_dim": K * size["f"]})
    config.model.moe = moe
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=3e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False, eval_steps=size["eval_steps"], load_balance_weight=0.01,
                                z_loss_weight=0.001)
    return config
