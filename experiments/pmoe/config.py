"""Patch-level routing (pMoE) against single two-layer CNNs on synthetic patch data (Chowdhury et al., ICML 2023).

python experiments/pmoe/run.py --preset=full      # the pre-registered sweep (README.md)
python experiments/pmoe/run.py --preset=pilot     # the pilot, into experiments/pmoe/pilot/

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets
  ``tiny``   the smoke test: 3 training-set sizes, 60 SGD steps, 200 test samples (a second per run).
  ``pilot``  README.md "Pilot": the full grid and training, seeds 0-2.
  ``full``   the pre-registered sweep: seeds 0-19, every variant.
variants  ``cnn_n<n>`` (a single two-layer CNN with k*m filters over all n patches), ``cnn4x_n<n>`` (the same
  with 4 k*m filters: larger capacity), ``pmoe_n<n>_l<l>`` (k experts of m filters, each fed its top-l patches
  by a learned linear router), ``pmoe_n<n>_l<l>_frozen`` (the router kept at its initialisation: a control).

Fixed for every run (our choices; README.md "Setup"): patch dimension d = 32, M = 8 label-irrelevant patterns,
noise std sigma = 0.1 per coordinate, k = 4 experts of m = 4 filters, a fixed +-1 second layer, SGD (lr 0.3,
batch 32, 4000 steps for every training-set size), test set of 2000 samples, sample-complexity threshold 0.95.
"""
from __future__ import annotations

import re

import ml_collections

PRESETS = ("tiny", "pilot", "full")
DIM, IRRELEVANT, SIGMA = 32, 8, 0.1
EXPERTS, FILTERS, LARGE = 4, 4, 4          # k experts, m filters per expert; cnn4x has LARGE * k * m filters
THRESHOLD = 0.95                           # test accuracy that defines the sample complexity
PRIMARY = ("cnn_n16", "pmoe_n16_l4")       # the primary configuration: n = 16, l = 4 (n/l = 4)
# The two axes of claim 1: n/l varied through n at l = 4, and through l at n = 16; (pmoe, its cnn) pairs.
N_AXIS = tuple((f"pmoe_n{n}_l4", f"cnn_n{n}") for n in (8, 16, 32))
L_AXIS = tuple((f"pmoe_n16_l{l}", "cnn_n16") for l in (8, 4, 2))
VARIANTS = ("cnn_n8", "cnn_n16", "cnn_n32", "cnn4x_n16",
            "pmoe_n8_l4", "pmoe_n16_l4", "pmoe_n32_l4", "pmoe_n16_l2", "pmoe_n16_l8", "pmoe_n16_l4_frozen")
PILOT_VARIANTS = VARIANTS
SEEDS = {"tiny": (0,), "pilot": (0, 1, 2), "full": tuple(range(20))}
GRID = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
SIZES = {  # training-set sizes (even: every prefix of the pool is balanced), SGD steps, batch, test samples
    "tiny": dict(sizes=(4, 8, 16), steps=60, batch=8, test_size=200),
    "pilot": dict(sizes=GRID, steps=4000, batch=32, test_size=2000),
    "full": dict(sizes=GRID, steps=4000, batch=32, test_size=2000),
}
TRAIN = dict(lr=0.3, init_scale=0.01, router_init_scale=0.001)

_VARIANT = re.compile(r"^(cnn|cnn4x)_n(\d+)$|^pmoe_n(\d+)_l(\d+)(_frozen)?$")


def parse_variant(variant: str) -> dict:
    """``"pmoe_n16_l4"`` -> ``{"model": "pmoe", "n": 16, "l": 4, "filters": m, "experts": k,
    "train_router": True}``; ``"cnn4x_n16"`` -> ``{"model": "cnn", "n": 16, "l": 16, "filters": 4 k m, ...}``."""
    m = _VARIANT.match(variant)
    if not m or variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    if m.group(1):
        n = int(m.group(2))
        filters = EXPERTS * FILTERS * (LARGE if m.group(1) == "cnn4x" else 1)
        return dict(model="cnn", n=n, l=n, filters=filters, experts=1, train_router=False)
    n, l = int(m.group(3)), int(m.group(4))
    return dict(model="pmoe", n=n, l=l, filters=FILTERS, experts=EXPERTS, train_router=not m.group(5))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    variant = variant or PRIMARY[1]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.preset = preset
    config.variant = variant
    config.update(parse_variant(variant))
    config.d, config.irrelevant, config.sigma = DIM, IRRELEVANT, SIGMA
    config.update(SIZES[preset])
    config.update(TRAIN)
    config.threshold = THRESHOLD
    return config


def setup(config: ml_collections.ConfigDict):
    """The :class:`patch_moe.Setup` of a config."""
    import importlib.util
    import os
    import sys
    name = "pmoe_patch_moe"
    if name not in sys.modules:  # the sibling module, loaded the way moejax.sweep.load_sibling does
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "patch_moe.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    pm = sys.modules[name]
    return pm.Setup(n=config.n, d=config.d, irrelevant=config.irrelevant, sigma=config.sigma, model=config.model,
                    filters=config.filters, experts=config.experts, l=config.l, train_router=config.train_router,
                    sizes=tuple(config.sizes), test_size=config.test_size, steps=config.steps, batch=config.batch,
                    lr=config.lr, init_scale=config.init_scale, router_init_scale=config.router_init_scale)
