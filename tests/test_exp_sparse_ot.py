"""experiments/sparse_ot: the tiny preset end to end, the decision rules on synthetic records, the configs."""
from __future__ import annotations

import json
import pathlib

import pytest

from moejax import sweep
from moejax.models import model_config

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "sparse_ot"


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


def _load(name: str):
    return sweep.load_sibling(str(ROOT / "run.py"), "sparse_ot", name)   # run.py's own names


def test_tiny_end_to_end(tmp_path):
    run, config = _load("run"), _load("config")
    summary = run.main(["--preset=tiny", "--variants=ksparse_ot", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}", "--compile_cache="])
    results = tmp_path / "results"
    for k in config.SOLVER["tiny"]["k_grid"]["assign"]:
        rec = json.loads((results / run.solver_name("assign", "agd", k)).read_text())
        assert len(rec["iterations"]) == config.SOLVER["tiny"]["instances"]
        assert all(n <= k + 1e-9 for n in rec["nnz_per_column"])          # the cardinality holds per column
        assert "git_commit" in rec["code"] and "dirty" in rec["code"] and rec["command"].startswith("experiments/")
    b = json.loads((results / "ksparse_ot_seed0.json").read_text())
    assert b["train_mode_dropped_fraction"] == 0.0                          # c = C: the plan never overflows
    assert b["eval_loss"] == pytest.approx(b["final_eval"]["loss"], rel=1e-4)
    verdicts = summary["A"]["verdicts"]
    assert verdicts["A1a_k1_unregularized"]["verdict"] in ("reproduced", "partly", "not reproduced",
                                                           "not testable here")
    assert verdicts["A2_convergence_primary"]["verdict"] == "not run"     # the tiny preset has no 'square'
    assert summary["B"]["verdicts"]["B_vs_topk"]["verdict"] == "not run"   # topk not in --variants
    again = run.main(["--preset=tiny", f"--results={results}", "--table"])
    assert again["A"]["cells"] == summary["A"]["cells"]
    assert (results / "table.md").read_text().startswith("Part A")


# ------------------------------------------------------------------------------- the rules on synthetic records


def _cell(k, **fields):
    n = len(next(iter(fields.values())))
    base = {"k": k, "converged": [True] * n, "iterations": [50] * n}
    return {**base, **fields}


def test_k1_rule():
    run = _load("run")
    good = _cell(1, tv_to_assignment=[0.0] * 10, value_gap=[0.0] * 10, second_best_gap=[1e-3] * 10)
    quad = _cell(8, tv_to_assignment=[0.3] * 10)
    assert run.k1_verdict(good, quad)["verdict"] == "reproduced"
    some = dict(good, tv_to_assignment=[0.0] * 8 + [0.2] * 2)
    assert run.k1_verdict(some, quad)["verdict"] == "partly"
    bad = dict(good, tv_to_assignment=[0.2] * 10)
    assert run.k1_verdict(bad, quad)["verdict"] == "not reproduced"
    # Controls: optimum not unique in most instances; or the regulariser does not move the plan.
    assert run.k1_verdict(dict(good, second_best_gap=[0.0] * 10), quad)["verdict"] == "not testable here"
    assert run.k1_verdict(good, _cell(8, tv_to_assignment=[0.0] * 10))["verdict"] == "not testable here"
    assert run.k1_verdict(None, quad)["verdict"] == "not run"


def test_large_k_rule():
    run = _load("run")
    kmin = _cell(1, tv_to_quadratic=[0.4] * 10)
    assert run.large_k_verdict(_cell(16, tv_to_quadratic=[1e-5] * 10), kmin)["verdict"] == "reproduced"
    assert run.large_k_verdict(_cell(16, tv_to_quadratic=[1e-5] * 8 + [0.1] * 2), kmin)["verdict"] == "partly"
    assert run.large_k_verdict(_cell(16, tv_to_quadratic=[0.1] * 10), kmin)["verdict"] == "not reproduced"
    unconverged = _cell(16, tv_to_quadratic=[1e-5] * 10, converged=[False] * 10)
    assert run.large_k_verdict(unconverged, kmin)["verdict"] == "not testable here"
    assert run.large_k_verdict(_cell(16, tv_to_quadratic=[1e-5] * 10),
                               _cell(1, tv_to_quadratic=[1e-5] * 10))["verdict"] == "not testable here"


def test_convergence_rule():
    run = _load("run")
    n = 10

    def grid(errors, tvs=(0.4, 0.1, 1e-4, 1e-4)):
        return {k: _cell(k, error_at_budget=[e] * n, tv_to_quadratic=[tv] * n, iterations=[100] * n)
                for k, e, tv in zip((1, 2, 4, 8), errors, tvs)}

    assert run.convergence_verdict(grid([0.5, 0.1, 0.01, 0.01]))["verdict"] == "reproduced"
    # Not monotone on an active pair (1 -> 2 gets worse), but k_max beats k_min tenfold: partly.
    assert run.convergence_verdict(grid([0.5, 0.9, 0.01, 0.01]))["verdict"] == "partly"
    # Past the first k that reaches the quadratic plan the pairs are not judged (identical problems).
    assert run.convergence_verdict(grid([0.5, 0.1, 0.01, 0.02]))["verdict"] == "reproduced"
    assert run.convergence_verdict(grid([0.02, 0.02, 0.01, 0.01]))["verdict"] == "not reproduced"   # ratio 2 < 10
    slow = grid([0.5, 0.1, 0.01, 0.01])
    slow[8] = dict(slow[8], converged=[False] * n)
    assert run.convergence_verdict(slow)["verdict"] == "not testable here"
    trivial = grid([0.5, 0.1, 0.01, 0.01])
    trivial[8] = dict(trivial[8], iterations=[1] * n)
    assert run.convergence_verdict(trivial)["verdict"] == "not testable here"
    assert run.convergence_verdict({})["verdict"] == "not run"


def test_router_rule():
    run = _load("run")

    def runs(diffs, ks_drop=0.0, top_drop=0.1):
        out = []
        for s, d in enumerate(diffs):
            out.append({"variant": "topk", "seed": s, "eval_loss": 2.0, "train_mode_dropped_fraction": top_drop})
            out.append({"variant": "ksparse_ot", "seed": s, "eval_loss": 2.0 + d,
                        "train_mode_dropped_fraction": ks_drop})
        return out

    assert run.router_verdict(runs([-0.05, -0.04, -0.06]), "topk")["verdict"] == "better"
    assert run.router_verdict(runs([0.001, -0.002, 0.003]), "topk")["verdict"] == "no worse"
    assert run.router_verdict(runs([0.1, 0.12, 0.11]), "topk")["verdict"] == "worse"
    assert run.router_verdict(runs([0.1, -0.1, 0.05]), "topk")["verdict"] == "inconclusive"
    assert run.router_verdict(runs([0.0, 0.0], ks_drop=0.01), "topk")["verdict"] == "not testable here"
    assert run.router_verdict(runs([0.0, 0.0], top_drop=0.0), "topk")["verdict"] == "not testable here"
    assert run.router_verdict(runs([0.0]), "sinkhorn")["verdict"] == "not run"


def test_every_preset_and_variant_config_is_valid():
    config = _load("config")
    for preset in config.PRESETS:
        for variant in config.VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            typed = model_config(cfg.model, vocab_size=256)
            moe = [s for s in typed.ffn_specs() if not isinstance(s, int)]
            assert len(moe) == 1 and moe[0].router.kind == variant
    with pytest.raises(ValueError, match="^preset="):
        config.get_config("huge")
    with pytest.raises(ValueError, match="^variant="):
        config.get_config("tiny,nope")
    assert set(config.SOLVER) == set(config.PRESETS)
