"""DynaMoE (Gülmez 2026): layer-wise capacity schedules and dynamic vs fixed top-k at a matched budget.

python -m moejax.main --config=experiments/dynamoe/config.py:registered,mnist1d-dyn-descending --workdir=/tmp/dynamoe
python experiments/dynamoe/run.py --preset=registered --threads=1    # the pre-registered sweep of README.md

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<dataset>-<routing>"``:

presets (all: an MLP with ``LAYERS = 4`` MoE layers, pre-norm residual blocks, ``residual=True``,
``norm='layernorm'``; each expert ``relu(x W_in + b) W_out + b``)
  ``tiny``       the smoke test (seconds): D=16, experts of width 8, 30 steps, and only 2 MoE layers with 6
                 experts and a total maximum k of 3 (so that it compiles quickly).
  ``registered`` the pre-registered sweep (README "Decision rules"): D=64, experts of width 32, ``STEPS`` steps
                 per dataset, batch 64; ``REGISTERED_VARIANTS`` (datasets ``REGISTERED_DATASETS`` x routings
                 ``REGISTERED_ROUTINGS``) x ``SEEDS['registered']``; results in ``results/registered/``.
  ``pilot``      the same model, variants and steps as ``registered``, seeds 0-2; results in ``pilot/``.
  ``full``       the superseded first sweep (README "Superseded results"): the same model, all 8 routings on
                 ``mnist1d`` and ``digits`` (``VARIANTS``), 3 seeds; kept so that its JSONs can be reproduced.
  ``paper``      for the paper's image datasets (``mnist``, ``fashion_mnist``, ``cifar10``; TFDS, needs a
                 network): D=256, experts of width 256, 10000 steps of batch 128. Never run here.
datasets
  ``mnist1d``, ``translated_digits`` (offline, shipped builders; presets ``pilot`` and ``registered``),
  ``digits`` (presets ``tiny`` and ``full``; at its ceiling in ``full``, hence replaced by ``translated_digits``);
  ``mnist``, ``fashion_mnist``, ``cifar10`` (preset ``paper``; also accepted by the others).
routings (the budget is the same for every one: ``TOTAL_EXPERTS = 16`` experts and a total maximum ``k`` of
``TOTAL_K = 8`` over the 4 layers, split by :func:`moejax.routing.schedules.scheduled_moe_layers`)
  ``dyn-<schedule>``  DynaMoE's dynamic routing (``router.kind='threshold'``, ``threshold_mode='percentile'``,
                      ``threshold = PERCENTILE``): a token activates every expert whose softmax score is in
                      the top ``100 - PERCENTILE`` % of all token-expert scores of the batch, at least 1 and at
                      most the layer's ``k``; for each of the six ``SCHEDULES``.
  ``top-uniform``, ``top-descending``  fixed top-k routing with exactly the same experts and per-layer ``k``
                      as ``dyn-uniform`` / ``dyn-descending`` (so the same parameters; ``k`` experts per token
                      always, i.e. at least the compute of the dynamic variant).

Dispatch: ``capacity`` mode (``index``) with ``capacity_factor = eval_capacity_factor = None``, i.e. ``C = T``:
no token is ever dropped, the same computation as ``dropless``, but it compiles about a third faster on CPU,
and compilation dominates these small runs.

Choices where the paper (of which we could read only the abstract) is silent: the percentile mode (our reading
of "the number of active experts per token varies based on input complexity"; the abstract names no mechanism)
with q = 60 — 40% of the token-expert pairs pass, 1.6 experts
per token on average in a 4-expert layer before the minimum of 1 and the maximum ``k`` apply (q = 75 left
the 2- and 3-expert layers at exactly one expert per token in a trial run, i.e. not dynamic at all); weights
are the raw softmax scores of the active experts (no renormalisation, as for fixed top-k here); Switch
load-balance loss 0.01 and router z-loss 0.001 as in the library's defaults; no dropped tokens (see
Dispatch). In evaluation the percentile is over an eval batch (``EVAL_BATCH``) instead of a training batch.
"""
from __future__ import annotations


import ml_collections
from ml_collections import config_dict

from moejax.routing.schedules import SCHEDULES, scheduled_moe_layers
from moejax.training.config import mesh_config, optimizer_config, train_config

PRESETS = ("tiny", "full", "pilot", "registered", "paper")
# Presets whose results are results (PROTOCOL.md section 5): run.py refuses them from a tree with uncommitted changes.
REFUSE_DIRTY = ("full", "registered")
LAYERS, TOTAL_EXPERTS, TOTAL_K, PERCENTILE = 4, 16, 8, 60.0
OFFLINE = ("mnist1d", "digits", "translated_digits")
NETWORK = ("mnist", "fashion_mnist", "cifar10")
ROUTINGS = tuple(f"dyn-{s}" for s in SCHEDULES) + ("top-uniform", "top-descending")
# The superseded ``full`` sweep: every routing on mnist1d and digits.
VARIANTS = tuple(f"{d}-{r}" for d in ("mnist1d", "digits") for r in ROUTINGS)
# The registered sweep (and its pilot): the routings the three claims compare, on two datasets off their ceiling.
REGISTERED_DATASETS = ("mnist1d", "translated_digits")
REGISTERED_ROUTINGS = ("dyn-uniform", "dyn-descending", "dyn-ascending", "top-uniform", "top-descending")
REGISTERED_VARIANTS = tuple(f"{d}-{r}" for d in REGISTERED_DATASETS for r in REGISTERED_ROUTINGS)
PAPER_VARIANTS = tuple(f"{d}-{r}" for d in NETWORK for r in ROUTINGS)
SEEDS = {"tiny": (0,), "full": (0, 1, 2), "pilot": (0, 1, 2), "registered": tuple(range(10)), "paper": (0, 1, 2)}
# Training steps of the full/pilot/registered presets per dataset (batch 64): ~19 epochs of mnist1d (4000 train),
# ~28 of digits (1437), ~13 of translated_digits (5748).
STEPS = {"mnist1d": 1200, "digits": 640, "translated_digits": 1200}
# Eval batches that divide the test split (1000, 360, 1440, 10000 examples) and the 8 devices of the tests: percentile
# routing is batch-dependent, and padding rows (all-zero inputs) would shift the percentile of a padded batch.
EVAL_BATCH = {"mnist1d": 200, "digits": 360, "translated_digits": 360, "mnist": 400, "fashion_mnist": 400,
              "cifar10": 400}
# Gradient noise is measured at these fractions of training (restored checkpoints; see run.py).
MEASURE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def parse_variant(variant: str) -> tuple[str, str, str]:
    """``"mnist1d-dyn-descending"`` -> ``("mnist1d", "threshold", "descending")``."""
    dataset, _, routing = variant.partition("-")
    if dataset not in OFFLINE + NETWORK or routing not in ROUTINGS:
        raise ValueError(f"variant={variant!r}: must be '<dataset>-<routing>' with dataset in "
                         f"{list(OFFLINE + NETWORK)} and routing in {list(ROUTINGS)}")
    kind, _, schedule = routing.partition("-")
    return dataset, {"dyn": "threshold", "top": "topk"}[kind], schedule


def moe_layers(kind: str, schedule: str, hidden_dim: int, layers: int = LAYERS, total_experts: int = TOTAL_EXPERTS,
               total_k: int = TOTAL_K) -> list[dict]:
    """``model.layers``: the per-layer MoE specs of ``schedule`` at the given expert and k budgets."""
    from moejax.config import DispatchConfig, MoEConfig, RouterConfig
    router = (RouterConfig(kind="threshold", k=1, threshold=PERCENTILE, threshold_mode="percentile")
              if kind == "threshold" else RouterConfig(kind="topk", k=1))
    dispatch = DispatchConfig(mode="capacity", capacity_impl="index", capacity_factor=None,
                              eval_capacity_factor=None)
    base = MoEConfig(num_experts=1, hidden_dim=hidden_dim, expert_kind="mlp", activation="relu", use_bias=True,
                     router=router, dispatch=dispatch)
    specs = scheduled_moe_layers(base, schedule, total_experts, layers, total_k)
    return [spec.to_dict() for spec in specs]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    variant = variant or ("mnist-dyn-descending" if preset == "paper" else "mnist1d-dyn-descending")
    if preset in ("pilot", "registered") and variant not in REGISTERED_VARIANTS:
        raise ValueError(f"variant={variant!r}: preset {preset!r} runs only {list(REGISTERED_VARIANTS)}")
    dataset, kind, schedule = parse_variant(variant)
    size = {"tiny": dict(d=16, f=8, batch=32, steps=30, budget=(2, 6, 3)),
            "full": dict(d=64, f=32, batch=64, steps=STEPS.get(dataset, max(STEPS.values()))),
            "pilot": dict(d=64, f=32, batch=64, steps=STEPS.get(dataset, max(STEPS.values()))),
            "registered": dict(d=64, f=32, batch=64, steps=STEPS.get(dataset, max(STEPS.values()))),
            "paper": dict(d=256, f=256, batch=128, steps=10000)}[preset]
    steps = size["steps"]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": dataset, "batch_size": size["batch"],
                                             "eval_batch_size": EVAL_BATCH[dataset], "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({"kind": "mlp", "d_model": size["d"], "residual": True,
                                              "norm": "layernorm",
                                              "layers": moe_layers(kind, schedule, size["f"], *size.get("budget", ()))})
    config.optimizer = optimizer_config(name="adamw", learning_rate=3e-3, schedule="warmup_cosine",
                                        warmup_steps=max(steps // 20, 1), weight_decay=1e-4, grad_clip_norm=1.0)
    # A checkpoint at every gradient-measurement point (all kept): run.py restores them after training.
    every = max(round(steps * MEASURE_FRACTIONS[0]), 1)
    config.train = train_config(steps=steps, log_every=max(steps // 40, 1), eval_every=steps, checkpoint_every=every,
                                keep_checkpoints=round(1 / MEASURE_FRACTIONS[0]), async_checkpoints=False,
                                tensorboard=False, load_balance_weight=0.01, z_loss_weight=0.001,
                                eval_steps=2 if preset == "tiny" else None)
    config.mesh = mesh_config()
    return config


def measure_steps(total_steps: int) -> list[int]:
    """The training steps at which run.py measures gradient noise (each a saved checkpoint)."""
    every = max(round(total_steps * MEASURE_FRACTIONS[0]), 1)
    return sorted({min(max(round(total_steps * f / every), 1) * every, total_steps) for f in MEASURE_FRACTIONS})
