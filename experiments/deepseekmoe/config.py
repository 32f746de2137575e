"""DeepSeekMoE (Dai et al. 2024) vs GShard top-2 on a byte-level LM: fine-grained + shared experts.

python -m moejax.main --config=experiments/deepseekmoe/config.py:full,fine_shared --workdir=/tmp/dsmoe
python experiments/deepseekmoe/run.py --preset=full          # the sweep behind README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets
  ``tiny``   a few steps of a 1-block model (the smoke test, seconds).
  ``full``   the README table: D=64, 2 blocks, 4 heads, L=128, batch 8, 500 steps on ``stdlib_bytes``; the
             baseline MoE FFN has N=8 SwiGLU experts of width F=64 (no biases) in every block. Sized so that
             the 15 runs fit in ~45 minutes on one contended CPU core.
  ``long``   ``full`` trained 4x longer (2000 steps): does the ranking change with more training?
  ``lm1b``   ``full``'s variants at a larger width (D=256, 4 blocks, F=512, L=256, batch 32) on the TFDS ``lm1b``
             dataset, for a machine with a network and an accelerator (never run here).
  ``registered``  the pre-registered rerun (README "Decision rules"): ``SIZES`` (``d64`` = ``full``'s model,
             ``d128`` = twice the width, experts twice as wide), 500 steps of batch 8 x 128 bytes, evaluated on
             ``EVAL_STEPS`` batches of two disjoint halves of the validation files: ``SELECT_SPLIT`` (learning-rate
             selection) and ``COMPARE_SPLIT`` (the comparison; the trainer's own evaluation). Variants are
             ``"<size>-<layout>@<lr>"`` (``"d128-fine_shared@0.002"``); run.py chooses each layout's learning rate
             on ``SELECT_SEEDS`` and compares at it on ``SEEDS['registered']``. ``REGISTERED_LAYOUTS`` per size.
  ``pilot``  the same configs as ``registered`` with the pilot's own seeds (``SELECT_SEEDS['pilot']``, disjoint
             from the registered ones); results in ``pilot/``.
variants (the MoE FFN of every block; built with :mod:`moejax.presets`)
  ``gshard``        ``gshard_top2(N, F)``: 8 experts of width F, top-2, renormalised gates.
  ``fine``          ``deepseekmoe(N, F, 2, segments=4, shared=0)``: 32 experts of width F/4, top-8.
  ``fine_shared``   ``deepseekmoe(N, F, 2, segments=4, shared=1)``: 31 routed experts of width F/4, top-7, plus
                    1 shared expert of width F/4 (the paper's construction: the shared expert is carved out of
                    the fine-grained ones, so total and active expert parameters stay those of ``gshard``).
  ``gshard_x1.5``   ``gshard_top2(N, 1.5 F)``: the paper's "GShard x1.5", 1.5x the expert parameters and
                    the expert computation of ``gshard``.
  ``dense``         no MoE: a dense SwiGLU FFN of width ``N F`` in every block, i.e. the total parameters of the
                    MoE models with all of them active (the paper's upper bound, "Dense x16" there).
In ``registered`` and ``pilot`` a variant is ``"[<size>-]<layout>[@<lr>]"`` (default ``d64`` and ``BASE_LR``), e.g.
``"d64-gshard_x1.5@0.004"``; the other presets take the bare layout and train at ``BASE_LR``.
"""
from __future__ import annotations


import ml_collections
from ml_collections import config_dict

from moejax import presets
from moejax.config import DispatchConfig
from moejax.training.config import optimizer_config, train_config

PRESETS = ("tiny", "full", "long", "lm1b", "pilot", "registered")
# Presets whose outputs are results (PROTOCOL.md section 5): run.py refuses them from a tree with uncommitted changes.
REFUSE_DIRTY = ("full", "long", "registered")
VARIANTS = ("gshard", "fine", "fine_shared", "gshard_x1.5", "dense")   # the expert layouts
EXPERT = {"expert_kind": "glu", "activation": "silu", "use_bias": False}
BASE_LR = 2e-3   # the learning rate of full / long (every layout), the centre of the registered grid

# ----------------------------------------------------------------------------- the registered rerun
# Model sizes: D, blocks, heads, expert width F (N = 8 experts of width F in the GShard baseline; the dense FFN is
# N F wide). d64 is full's model; d128 doubles D and F (about 4x the parameters and the per-token FLOPs).
SIZES = {"d64": dict(d=64, layers=2, heads=4, f=64), "d128": dict(d=128, layers=2, heads=4, f=128)}
# The layouts each size runs (the larger model: the primary comparison, gshard vs fine_shared; the budget allows no
# more, README "Command").
REGISTERED_LAYOUTS = {"d64": VARIANTS, "d128": ("gshard", "fine_shared")}
# The base learning-rate grid of every layout of a size (factor-2 steps), set by the pilot (README "Pilot"): at d64
# the best learning rates of 4 layouts were 8e-3, at d128 gshard was better at 4e-3 than at 8e-3.
LR_GRID = {"d64": (4e-3, 8e-3, 1.6e-2), "d128": (2e-3, 4e-3, 8e-3)}
LR_EXTEND_MAX = 1              # at most this many factor-2 steps beyond an edge of LR_GRID (README "LR selection")
REGISTERED_STEPS, EVAL_STEPS = 500, 32
# Disjoint halves of the stdlib_bytes validation files (sorted by path; 192 kB and 442 kB): the learning rate is
# chosen on SELECT_SPLIT, the layouts are compared on COMPARE_SPLIT (the first EVAL_STEPS x 16 x 128 bytes of each).
SELECT_SPLIT, COMPARE_SPLIT = "validation[:50%]", "validation[50%:]"
SEEDS = {"tiny": (0,), "full": (0, 1, 2), "long": (0, 1, 2), "lm1b": (0, 1, 2), "pilot": (91, 92),
         "registered": (0, 1, 2, 3, 4, 5, 6)}
SELECT_SEEDS = {"pilot": (90,), "registered": (100,)}   # learning-rate selection (never in the comparison)


def lr_tag(lr: float) -> str:
    """``0.002`` for 2e-3: the learning rate as it appears in variant names and file names."""
    return f"{float(lr):g}"


def lr_grid(size: str, extend: int = LR_EXTEND_MAX) -> tuple[float, ...]:
    """``LR_GRID[size]`` with ``extend`` factor-2 steps added beyond each edge (the learning rates a run may use)."""
    grid = LR_GRID[size]
    lo, hi = min(grid), max(grid)
    return tuple(sorted({lo / 2 ** k for k in range(1, extend + 1)} | set(grid)
                        | {hi * 2 ** k for k in range(1, extend + 1)}))


def variant_name(size: str, layout: str, lr: float) -> str:
    return f"{size}-{layout}@{lr_tag(lr)}"


def parse_variant(variant: str) -> tuple[str, str, float]:
    """``"d128-fine_shared@0.004"`` -> ``("d128", "fine_shared", 0.004)``; size defaults to ``d64`` and the learning
    rate to ``BASE_LR``. Sizes, layouts and learning rates outside ``SIZES``, ``VARIANTS``, ``lr_grid(size)`` fail."""
    rest, _, lr = variant.partition("@")
    size, _, layout = rest.rpartition("-")
    size = size or "d64"
    allowed = [lr_tag(x) for x in lr_grid(size)] if size in SIZES else []
    if size not in SIZES or layout not in VARIANTS or (lr and lr not in allowed):
        raise ValueError(f"variant={variant!r}: must be '[<size>-]<layout>[@<lr>]' with size in {list(SIZES)}, "
                         f"layout in {list(VARIANTS)}, lr in {allowed}")
    return size, layout, float(lr) if lr else BASE_LR


def moe_spec(variant: str, num_experts: int, hidden_dim: int) -> dict | None:
    """The ``model.moe`` mapping of ``variant`` (None for ``dense``), from the presets."""
    common = dict(EXPERT, dispatch=DispatchConfig(mode="dropless"))
    if variant == "gshard":
        cfg = presets.gshard_top2(num_experts, hidden_dim, **common)
    elif variant == "gshard_x1.5":
        cfg = presets.gshard_top2(num_experts, hidden_dim * 3 // 2, **common)
    elif variant == "fine":
        cfg = presets.deepseekmoe(num_experts, hidden_dim, 2, segments=4, shared=0, **common)
    elif variant == "fine_shared":
        cfg = presets.deepseekmoe(num_experts, hidden_dim, 2, segments=4, shared=1, **common)
    elif variant == "dense":
        return None
    else:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    return cfg.to_dict()  # a plain mapping: overridable from the command line, JSON-able


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    variant = variant or "fine_shared"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    registered = preset in ("pilot", "registered")
    if registered:
        model_size, variant, lr = parse_variant(variant)
        size = dict(SIZES[model_size], seq=128, batch=8, steps=REGISTERED_STEPS)
    else:
        lr = BASE_LR
        size = {"tiny": dict(d=32, layers=1, heads=2, f=32, seq=32, batch=8, steps=10),
                "full": dict(d=64, layers=2, heads=4, f=64, seq=128, batch=8, steps=500),
                "long": dict(d=64, layers=2, heads=4, f=64, seq=128, batch=8, steps=2000),
                "lm1b": dict(d=256, layers=4, heads=8, f=512, seq=256, batch=32, steps=20000)}[preset]
    experts = 8
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({
        "name": "lm1b" if preset == "lm1b" else "stdlib_bytes", "batch_size": size["batch"],
        "eval_batch_size": 2 * size["batch"], "seq_len": size["seq"], "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    if registered:
        config.data.eval_split = COMPARE_SPLIT   # the trainer evaluates on the comparison half
    config.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": size["d"], "num_layers": size["layers"], "num_heads": size["heads"],
        "moe_every": 1, "ffn_kind": "glu", "activation": "silu", "use_bias": False,
        "dense_hidden_dim": experts * size["f"],  # used only by dense blocks, i.e. by the dense variant
    })
    config.model.moe = moe_spec(variant, experts, size["f"])
    steps = size["steps"]
    config.optimizer = optimizer_config(name="adamw", learning_rate=lr, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=0.01, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                                checkpoint_every=steps, keep_checkpoints=1, async_checkpoints=False,
                                tensorboard=False,
                                eval_steps=2 if preset == "tiny" else EVAL_STEPS if registered else 20,
                                load_balance_weight=0.01, z_loss_weight=0.001)
    return config
