"""experiments/dynamoe: the pre-registered decision rules on synthetic records (report.py), the paired statistics,
the registered preset's configs validated without training and the per-example routing summary. The tiny sweep
end to end and the dirty-tree refusal are tests/test_experiments.py's."""
import math
import pathlib

import numpy as np
import pytest

from moejax import sweep
from moejax.models import model_config

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"
DATASETS = ("mnist1d", "translated_digits")


def _load(name: str):
    return sweep.load_sibling(str(ROOT / "dynamoe" / "run.py"), "dynamoe", name)   # run.py's own module names


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


# ------------------------------------------------------------------------------------- configs, provenance
def test_registered_configs_are_valid_and_match_budgets():
    config = _load("config")
    assert len(config.SEEDS["registered"]) >= 10 and config.SEEDS["registered"] == tuple(range(10))
    assert "registered" in config.REFUSE_DIRTY and "full" in config.REFUSE_DIRTY
    assert set(config.REGISTERED_DATASETS) == set(DATASETS)
    shapes = {"mnist1d": (40, 1), "translated_digits": (24, 24, 1)}
    for preset in ("pilot", "registered"):
        for variant in config.REGISTERED_VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            layers = cfg.model.layers
            assert sum(l["num_experts"] for l in layers) == config.TOTAL_EXPERTS
            assert sum(l["router"]["k"] for l in layers) == config.TOTAL_K
            assert cfg.train.steps == config.STEPS[cfg.data.name] and "train_split" not in cfg.data   # whole split
            assert cfg.model.d_model == 64 and all(l["hidden_dim"] == 32 for l in layers)
            assert model_config(cfg.model, num_classes=10, input_shape=shapes[cfg.data.name]) is not None
            assert all(l["router"]["kind"] == ("threshold" if "-dyn-" in variant else "topk") for l in layers)
    # Every primary and secondary pair of the rules is in the registered sweep.
    report = _load("report")
    for pairs in [(report.PRIMARY[c],) + report.SECONDARY[c] for c in "abc"]:
        for a, b in pairs:
            assert a in config.REGISTERED_ROUTINGS and b in config.REGISTERED_ROUTINGS
    with pytest.raises(ValueError, match="^variant="):
        config.get_config("registered,digits-dyn-uniform")          # digits is not in the registered sweep
    # The eval batch divides every test split (percentile routing must never see padding rows).
    assert 1440 % config.EVAL_BATCH["translated_digits"] == 0 and 1000 % config.EVAL_BATCH["mnist1d"] == 0


def test_routing_summary_and_padding_refusal():
    run = _load("run")
    out = run.routing_summary([np.array([1, 2, 2, 1, 2]), np.array([1, 1, 1, 1, 1]), np.array([3, 1, 2, 3, 3])])
    assert out["experts_per_token"] == pytest.approx([1.6, 1.0, 2.4])
    assert out["histogram"] == [[0, 2, 3], [0, 5], [0, 1, 1, 3]]
    assert out["off_mode_fraction"] == pytest.approx([0.4, 0.0, 0.4])
    # Percentile routing is batch-dependent: an eval batch with padding rows is refused before any forward pass
    # (the tiny sweep in tests/test_experiments.py runs the forward pass itself).
    batch = {"inputs": np.zeros((4, 8, 8, 1), np.float32), "labels": np.zeros(4, np.int32),
             "mask": np.array([1, 1, 1, 0], np.float32)}
    with pytest.raises(ValueError, match="padding"):
        run.routing_on_test_set(None, {"params": {}, "moe_state": {}}, [batch], "classification")


# ------------------------------------------------------------------------------------- decision rules
LAYERS = {"uniform": [(4, 2)] * 4, "descending": [(6, 3), (5, 2), (3, 2), (2, 1)],
          "ascending": [(2, 1), (3, 2), (5, 2), (6, 3)]}


def _record(dataset, routing, seed, acc, ept, off, noise, trace):
    kind, schedule = routing.split("-")
    layers = [{"num_experts": e, "k": k} for e, k in LAYERS[schedule]]
    groups = {g: {"noise": noise, "trace": trace, "mean_sq_norm": 1.0} for g in ("router", "experts", "other", "all")}
    return {"variant": f"{dataset}-{routing}", "seed": seed, "layers": layers,
            "final_eval": {"accuracy": acc, "loss": 1.0}, "params": {"total": 1}, "wall_clock_s": 1.0,
            "experts_per_token_train": {"mean": ept}, "test_routing": {"experts_per_token": ept,
                                                                      "off_mode_fraction": off},
            "grad_noise": [{"step": s, "groups": groups} for s in (10, 20, 40, 80)],
            "train_curve": [{"step": i, "loss": 1.0 + 0.01 * (-1) ** i} for i in range(40)]}


def _runs(a_gain=0.02, top_gain=0.0, noise_ratio=0.8, trace_ratio=0.8, dyn_minus_top=0.002, sd=0.004,
          a_sd=0.004, base=0.70, off=0.4, dyn_ept=1.54, datasets=DATASETS):
    """Ten seeds per variant; ``sd`` (dynamic vs top-k) and ``a_sd`` (descending vs uniform) alternate in sign with
    the seed: the per-seed spread of those paired differences."""
    runs = []
    for d in datasets:
        for s in range(10):
            alt = (-1) ** s
            top = base + 0.005 * (s % 3 - 1)
            dyn = top + dyn_minus_top + sd * alt
            wig = math.exp(0.05 * alt)
            runs += [
                _record(d, "top-uniform", s, top, [2.0] * 4, [0.0] * 4, 10.0, 10.0),
                _record(d, "top-descending", s, top + top_gain + 0.004 * alt, [3.0, 2.0, 2.0, 1.0], [0.0] * 4,
                        10.0, 10.0),
                _record(d, "dyn-uniform", s, dyn, [dyn_ept] * 4, [off] * 4, 10 * noise_ratio * wig,
                        10 * trace_ratio * wig),
                _record(d, "dyn-descending", s, dyn + a_gain + a_sd * alt, [2.3, 1.7, 1.2, 1.0], [off] * 3 + [0.0],
                        10 * noise_ratio * wig, 10 * trace_ratio * wig),
                _record(d, "dyn-ascending", s, dyn - 0.01, [1.0, 1.2, 1.7, 2.3], [0.0] + [off] * 3, 10.0, 10.0),
            ]
    return runs


R, P, N, T = "reproduced", "partly reproduced", "not reproduced", "not testable here"


@pytest.mark.parametrize("runs,expected", [
    # descending clearly better, noise 0.8x, 0.77x the expert parameters at equal accuracy
    (_runs(), (R, R, R)),
    # descending = uniform under dynamic routing but better under top-k; normalised noise ~1 but summed variance
    # 0.8x; the saving holds but accuracy -0.008 ± 0.010 is not shown non-inferior at the 0.01 margin
    (_runs(a_gain=0.0, top_gain=0.02, noise_ratio=1.0, dyn_minus_top=-0.008, sd=0.01), (P, P, P)),
    # descending clearly worse; noise 1.2x; dynamic routing clearly less accurate
    (_runs(a_gain=-0.02, top_gain=0.02, noise_ratio=1.2, trace_ratio=1.2, dyn_minus_top=-0.03), (N, N, N)),
    # no saving (1.95 of 2 experts per layer) at equal accuracy: (c) not reproduced
    (_runs(dyn_ept=1.95), (R, R, N)),
    # at the ceiling (a, c) and dynamic routing never varies (all three): every claim untestable
    (_runs(base=0.98, off=0.0), (T, T, T)),
    # the paired accuracy differences too noisy to resolve 0.02: (a) and (c) untestable, (b) still decided
    (_runs(sd=0.05, a_sd=0.05), (T, R, T)),
])
def test_decision_rules(runs, expected):
    report = _load("report")
    v = report.verdicts(runs)
    assert tuple(v[c]["verdict"] for c in "abc") == expected
    for c in "abc":
        assert set(v[c]["datasets"]) == set(DATASETS)
    summary = report.summarize(runs)
    assert summary["verdicts"]["a"]["verdict"] == expected[0]
    assert "| **(c) verdict** | all |" in report.verdict_table(summary)
    assert "dyn-uniform" in report.table(summary)


def test_combine_over_datasets_and_controls():
    report = _load("report")
    assert report.combine([R, N]) == P and report.combine([R, T]) == R and report.combine([N, N]) == N
    assert report.combine([T, T]) == T and report.combine(["not run", "not run"]) == "not run"
    # One dataset reproduces, the other does not: partly, with each dataset's own outcome kept.
    runs = _runs(datasets=("mnist1d",)) + _runs(a_gain=-0.02, noise_ratio=1.2, trace_ratio=1.2,
                                                dyn_minus_top=-0.03, datasets=("translated_digits",))
    v = report.verdicts(runs)
    assert [v[c]["verdict"] for c in "abc"] == [P, P, P]
    assert v["a"]["datasets"]["mnist1d"]["outcome"] == R and v["a"]["datasets"]["translated_digits"]["outcome"] == N
    # Records without per-example test routing (the superseded sweep) get no verdict.
    old = [{k: x for k, x in r.items() if k != "test_routing"} for r in runs]
    assert report.verdicts(old) == {}


def test_paired_statistics():
    report = _load("report")
    a = [{"seed": s, "final_eval": {"accuracy": 0.5 + 0.01 * s}} for s in range(3)]
    b = [{"seed": s, "final_eval": {"accuracy": 0.5}} for s in (2, 1, 0, 7)]
    p = report.paired(a, b, lambda x, y: report.accuracy(x) - report.accuracy(y))
    assert p["seeds"] == [0, 1, 2] and p["per_seed"] == pytest.approx([0.0, 0.01, 0.02])
    assert p["positive"] == 2 and p["negative"] == 0 and p["std"] == pytest.approx(0.01)
    assert p["ci95"][0] == pytest.approx(0.01 - 4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    assert not report.clearly_positive(p)                                      # the interval includes 0
    q = {"n": 10, "positive": 7, "negative": 3, "ci95": [0.001, 0.01]}
    assert report.clearly_positive(q) and not report.clearly_positive({**q, "positive": 6})
