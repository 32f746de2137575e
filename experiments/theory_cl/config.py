"""Theory on MoE in continual learning (Li et al., ICLR 2025): linear experts on a stream of over-parameterised
regression tasks, the gate frozen after T1 rounds or never.

python experiments/theory_cl/run.py --preset=full      # the pre-registered sweep (README.md)
python experiments/theory_cl/run.py --preset=pilot     # the pilot, into experiments/theory_cl/pilot/

``get_config(arg)``, ``arg = "<preset>"`` or ``"<preset>,<variant>"``:

presets
  ``tiny``   the smoke test: 200 rounds, T1 = 100 (milliseconds per run).
  ``pilot``  README.md "Pilot": 3000 rounds, T1 = 1500, seeds 0 and 1; the three ``FULL_REGIMES`` at every M
             and two more regimes at M = 2N (``PILOT_VARIANTS``).
  ``full``   the pre-registered sweep: 6000 rounds, T1 = 1500, seeds 0..19; every M and gate in the three
             ``FULL_REGIMES``: ``isotropic`` (the primary: the verdicts) and ``aligned``, ``aligned_lr3``
             (robustness, judged by the same rules and reported beside it).
variants  ``"M<k>-<gate>[@<regime>]"``:
  ``k``       ``1``, ``N``, ``2N``, ``4N`` experts (N = ``CLUSTERS`` = 4 ground truths);
  ``gate``    ``frozen`` (no gate update after round T1) or ``never`` (updated every round); ``M1`` has no gate;
  ``regime``  a key of ``REGIMES`` (default ``PRIMARY_REGIME``).

Fixed for every run (our choices where the paper is silent or we could not read it; README.md "Setup"): d = 10
features, s = 6 samples per task (over-parameterised: d > s), signal length beta = 1, noise samples with entries
N(0, 0.05^2), ground truths ``w_n = a v_n + N(0, I/d)`` with ``a`` set by the regime.
"""
from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "pilot", "full")
CLUSTERS, DIM, SAMPLES, BETA, SIGMA = 4, 10, 6, 1.0, 0.05
EXPERTS = {"1": 1, "N": CLUSTERS, "2N": 2 * CLUSTERS, "4N": 4 * CLUSTERS}
# Gate and data regimes: lr = eta (gate step), alpha (load-balancing weight), noise = lambda (routing noise is
# Unif[0, lambda]), signal_weight = a (ground truths w_n = a v_n + N(0, I/d)). Variants without a suffix use
# PRIMARY_REGIME. The pilot (README.md, "Pilot") ran all five; FULL_REGIMES are the three whose positive controls
# passed at M = 2N, and the primary is the one that passed them at both M = 2N and M = 4N.
REGIMES = {
    "isotropic": dict(lr=10.0, alpha=50.0, noise=3.0, signal_weight=0.0),
    "aligned": dict(lr=10.0, alpha=50.0, noise=3.0, signal_weight=1.0),
    "aligned_lr3": dict(lr=3.0, alpha=50.0, noise=3.0, signal_weight=1.0),
    "aligned_lr1": dict(lr=1.0, alpha=50.0, noise=3.0, signal_weight=1.0),
    "aligned_weakbalance": dict(lr=10.0, alpha=0.5, noise=3.0, signal_weight=1.0),
}
PRIMARY_REGIME = "isotropic"
FULL_REGIMES = ("isotropic", "aligned", "aligned_lr3")
PRIMARY_VARIANTS = ("M1", "MN-frozen", "MN-never", "M2N-frozen", "M2N-never", "M4N-frozen", "M4N-never")
VARIANTS = PRIMARY_VARIANTS + tuple(f"{v}@{regime}" for regime in FULL_REGIMES[1:] for v in PRIMARY_VARIANTS)
PILOT_VARIANTS = VARIANTS + tuple(f"M2N-{gate}@{regime}" for regime in REGIMES if regime not in FULL_REGIMES
                                  for gate in ("frozen", "never"))
SEEDS = {"tiny": (0,), "pilot": (0, 1), "full": tuple(range(20))}
SIZES = {  # rounds T, T1, log every; T1 a multiple of log_every so the drift windows split exactly at T1
    "tiny": dict(rounds=200, t1=100, log_every=20),
    "pilot": dict(rounds=3000, t1=1500, log_every=100),
    "full": dict(rounds=6000, t1=1500, log_every=100),
}


def parse_variant(variant: str) -> tuple[int, str, str]:
    """``"M2N-never@aligned"`` -> ``(8, "never", "aligned")``; ``"M1"`` -> ``(1, "none", PRIMARY_REGIME)``.
    (``M1`` has no gate, but its regime still sets the ground truths' ``signal_weight``.)"""
    body, _, regime = variant.partition("@")
    regime = regime or PRIMARY_REGIME
    experts, _, gate = body.partition("-")
    key = experts[1:] if experts.startswith("M") else None
    ok = (key in EXPERTS and regime in REGIMES
          and ((key == "1" and gate == "") or (key != "1" and gate in ("frozen", "never"))))
    if not ok:
        raise ValueError(f"variant={variant!r}: must be 'M1' or 'M<k>-<frozen|never>[@<regime>]' with k in "
                         f"{[k for k in EXPERTS if k != '1']} and regime in {list(REGIMES)}")
    return EXPERTS[key], gate or "none", regime


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "full").partition(",")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {list(PRESETS)}")
    experts, gate, regime = parse_variant(variant or "M2N-frozen")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.variant = variant or "M2N-frozen"
    config.regime = regime
    config.gate = gate
    config.dim, config.samples, config.clusters, config.experts = DIM, SAMPLES, CLUSTERS, experts
    config.beta, config.sigma = BETA, SIGMA
    config.update(REGIMES[regime])
    config.update(SIZES[preset])
    # Analysis settings (derived_metrics): "late" = the last 20% of rounds; converged = median system error of
    # the last 5 logs <= 1% of the zero model's error.
    config.late_fraction, config.conv_threshold, config.conv_window = 0.2, 0.01, 5
    return config


def sim_config(config: ml_collections.ConfigDict):
    """The :class:`cl_moe.SimConfig` of a config (``freeze_after = T1`` for ``frozen``, None otherwise)."""
    import importlib.util
    import os
    import sys
    name = "theory_cl_cl_moe"
    if name not in sys.modules:  # the sibling module, loaded the way moejax.sweep.load_sibling does
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "cl_moe.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    cl_moe = sys.modules[name]
    return cl_moe.SimConfig(
        dim=config.dim, samples=config.samples, clusters=config.clusters, experts=config.experts,
        rounds=config.rounds, lr=config.lr, noise=config.noise, alpha=config.alpha, beta=config.beta,
        sigma=config.sigma, signal_weight=config.signal_weight,
        freeze_after=config.t1 if config.gate == "frozen" else None, reference_t1=config.t1,
        log_every=config.log_every)
