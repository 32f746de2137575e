"""experiments/deepseekmoe: the pre-registered rerun's learning-rate selection and decision rules (report.py) on
synthetic records, its configs validated without training, the two-stage orchestration of run.py with a fake
trainer and the n-gram baselines. The tiny sweep end to end and the dirty-tree refusal of every registered preset
are tests/test_experiments.py's."""
import json
import math
import pathlib

import numpy as np
import pytest

from moejax import sweep
from moejax.models import model_config

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    return sweep.load_sibling(str(ROOT / "deepseekmoe" / "run.py"), "deepseekmoe", name)   # run.py's own names


R, P, N, T = "reproduced", "partly reproduced", "not reproduced", "not testable here"


# ------------------------------------------------------------------------------------- configs
def test_registered_configs():
    config = _load("config")
    assert set(config.REFUSE_DIRTY) >= {"registered", "full", "long"}
    assert len(config.SEEDS["registered"]) >= 5
    for preset in ("pilot", "registered"):   # learning-rate selection never uses a comparison seed
        assert not set(config.SELECT_SEEDS[preset]) & set(config.SEEDS[preset])
    assert not set(config.SELECT_SEEDS["pilot"] + config.SEEDS["pilot"]) & set(
        config.SELECT_SEEDS["registered"] + config.SEEDS["registered"])   # the pilot's seeds are its own
    for size, grid in config.LR_GRID.items():
        assert sorted(grid) == list(grid) and len(grid) >= 3
        assert config.lr_grid(size) == (grid[0] / 2, *grid, grid[-1] * 2) and config.lr_grid(size, 0) == grid
        assert config.BASE_LR in config.lr_grid(size)     # the unregistered sweep's learning rate is reachable
    assert config.SELECT_SPLIT != config.COMPARE_SPLIT
    assert set(config.REGISTERED_LAYOUTS["d64"]) == set(config.VARIANTS)
    assert {"gshard", "fine_shared"} <= set(config.REGISTERED_LAYOUTS["d128"])
    for size, layouts in config.REGISTERED_LAYOUTS.items():
        for layout in layouts:
            for lr in config.lr_grid(size):
                name = config.variant_name(size, layout, lr)
                assert config.parse_variant(name) == (size, layout, lr)
                cfg = config.get_config(f"registered,{name}")
                assert cfg.optimizer.learning_rate == lr and cfg.model.d_model == config.SIZES[size]["d"]
                assert cfg.data.eval_split == config.COMPARE_SPLIT and cfg.train.eval_steps == config.EVAL_STEPS
                assert cfg.train.steps == config.REGISTERED_STEPS
                assert model_config(cfg.model, vocab_size=256) is not None
    # Equal expert parameters: N F hidden units in every MoE layout of a size (x1.5 for gshard_x1.5).
    for size, dims in config.SIZES.items():
        units = {}
        for layout in ("gshard", "fine", "fine_shared", "gshard_x1.5"):
            moe = config.get_config(f"registered,{size}-{layout}").model.moe
            units[layout] = moe["num_experts"] * moe["hidden_dim"] + (moe["num_shared_experts"] or 0) * (
                moe["shared_hidden_dim"] or 0)
        assert units["gshard"] == units["fine"] == units["fine_shared"] == 8 * dims["f"]
        assert units["gshard_x1.5"] == 12 * dims["f"]
    # full and long are the unregistered sweep's configs: one learning rate, the whole validation split.
    for preset in ("full", "long"):
        cfg = config.get_config(f"{preset},fine_shared")
        assert cfg.optimizer.learning_rate == 2e-3 and "eval_split" not in cfg.data and cfg.train.eval_steps == 20
    for bad in ("registered,d32-gshard", "registered,d64-gshard@0.003", "registered,d64-gshard@0.001",
                "registered,d64-nope"):
        with pytest.raises(ValueError, match="^variant="):
            config.get_config(bad)


# ------------------------------------------------------------------------------------- learning-rate selection
def _sel(lr, seed, loss, size="d64", layout="gshard"):
    return {"size": size, "layout": layout, "lr": lr, "seed": seed, "val_loss": {"select": loss, "compare": 9.0}}


def test_choose_lr_argmin_ties_edges_and_divergence():
    report = _load("report")
    allowed = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
    runs = [_sel(1e-3, 0, 2.40), _sel(2e-3, 0, 2.30), _sel(4e-3, 0, 2.35)]
    c = report.choose_lr(runs, allowed, [0])
    assert c["lr"] == 2e-3 and not c["at_edge"] and c["next"] is None and c["grid"] == [1e-3, 2e-3, 4e-3]
    # Statistic: the mean over the selection seeds; a seed outside them is ignored.
    runs += [_sel(1e-3, 1, 2.10), _sel(2e-3, 1, 2.30), _sel(4e-3, 1, 2.35), _sel(2e-3, 7, 0.0)]
    c = report.choose_lr(runs, allowed, [0, 1])
    assert c["lr"] == 1e-3 and c["losses"]["0.001"] == pytest.approx(2.25)
    assert c["at_edge"] and c["next"] == 5e-4          # lower edge: run 5e-4 next
    # After the extension the choice is inside; a learning rate missing a selection seed does not count.
    c = report.choose_lr(runs + [_sel(5e-4, 0, 2.5), _sel(5e-4, 1, 2.5), _sel(8e-3, 0, 0.1)], allowed, [0, 1])
    assert c["lr"] == 1e-3 and not c["at_edge"] and c["next"] is None and 8e-3 not in c["grid"]
    # Upper edge at the end of the allowed grid: nothing left to run, the choice stays at the edge.
    c = report.choose_lr([_sel(2e-3, 0, 2.4), _sel(4e-3, 0, 2.3), _sel(8e-3, 0, 2.2)], allowed, [0])
    assert c["lr"] == 8e-3 and c["at_edge"] and c["next"] is None
    # Exact tie -> the smaller learning rate; a diverged run (nan) never wins.
    c = report.choose_lr([_sel(1e-3, 0, 2.3), _sel(2e-3, 0, 2.2), _sel(4e-3, 0, 2.2)], allowed, [0])
    assert c["lr"] == 2e-3 and not c["at_edge"]
    c = report.choose_lr([_sel(1e-3, 0, 2.3), _sel(2e-3, 0, 2.2), _sel(4e-3, 0, float("nan"))], allowed, [0])
    assert c["lr"] == 2e-3 and c["losses"]["0.004"] == math.inf


# ------------------------------------------------------------------------------------- decision rules
SEEDS = range(5)
LAYOUTS = {"d64": ("gshard", "fine", "fine_shared", "gshard_x1.5", "dense"),
           "d128": ("gshard", "fine_shared", "gshard_x1.5")}


def _rec(size, layout, seed, loss, unigram=3.0, inc=0.2):
    return {"size": size, "layout": layout, "lr": 2e-3, "seed": seed, "variant": f"{size}-{layout}@0.002",
            "val_loss": {"select": loss, "compare": loss}, "baselines": {"unigram": unigram, "bigram": 2.6},
            "redundancy": {} if layout == "dense" else {"0.125": {"increase": inc}, "0.250": {"increase": 2 * inc}},
            "params": {"total": 1, "active": 1}, "wall_clock_s": 1.0}


def _runs(means, sd=0.005, sizes=("d64", "d128"), **kw):
    """5 seeds per layout: ``means[size][layout]`` (or one dict for both sizes) + a seed effect shared by all layouts
    + ``sd`` alternating in sign with the seed for fine_shared and fine (the spread of their paired differences)."""
    runs = []
    for size in sizes:
        m = means.get(size, means)
        for layout in LAYOUTS[size]:
            if layout not in m:
                continue
            for s in SEEDS:
                wobble = sd * (-1) ** s if layout in ("fine_shared", "fine") else 0.0
                runs.append(_rec(size, layout, s, m[layout] + 0.01 * (s % 3) + wobble, **kw))
    return runs


def _choices(edge=()):
    return {size: {l: {"lr": 2e-3, "at_edge": (size, l) in edge, "losses": {}, "grid": [], "next": None}
                   for l in layouts} for size, layouts in LAYOUTS.items()}


OLD = {"gshard": 2.31, "fine": 2.31, "fine_shared": 2.34, "gshard_x1.5": 2.275, "dense": 2.16}   # the 3-seed picture
GOOD = {"gshard": 2.30, "fine": 2.28, "fine_shared": 2.20, "gshard_x1.5": 2.26, "dense": 2.15}
SOME = {"gshard": 2.30, "fine": 2.28, "fine_shared": 2.27, "gshard_x1.5": 2.20, "dense": 2.10}
TIE_FINE = {"gshard": 2.30, "fine": 2.27, "fine_shared": 2.30, "gshard_x1.5": 2.26, "dense": 2.15}


@pytest.mark.parametrize("runs,choices,expected", [
    # fine_shared 0.10 better than gshard: beyond the midpoints of gshard and both references
    (_runs(GOOD), _choices(), (R, R, R)),
    # the unregistered sweep's picture at both sizes: fine_shared worse than gshard
    (_runs(OLD), _choices(), (N, N, N)),
    # fine_shared 0.03 better than gshard: less than half of the references' gains (0.10, 0.20) -> partly
    (_runs(SOME), _choices(), (R, P, P)),
    # fine_shared = gshard, but segmentation alone (fine, d64 only) is clearly better: partly at d64, not at d128
    (_runs(TIE_FINE), _choices(), (P, N, N)),
    # reproduced at d64, not at d128 -> partly (claim 3 only at d64, where dense runs)
    (_runs({"d64": GOOD, "d128": OLD}), _choices(), (P, P, R)),
    # fine_shared's learning rate at an edge at d64: d64 drops out of every claim, d128 decides 1 and 2
    (_runs({"d64": GOOD, "d128": OLD}), _choices(edge=[("d64", "fine_shared")]), (N, N, T)),
    # nothing learned beyond the unigram model: every claim untestable
    (_runs(GOOD, unigram=2.35), _choices(), (T, T, T)),
    # routing does not matter (masking the top routed experts costs nothing): untestable
    (_runs(GOOD, inc=0.0), _choices(), (T, T, T)),
    # seed spread far too large to resolve 0.03, every interval contains 0: untestable
    (_runs(GOOD, sd=0.08), _choices(), (T, T, T)),
    # as wide, but a larger effect: every interval excludes 0, so decisive whatever its width
    (_runs({**GOOD, "fine_shared": 2.10}, sd=0.05), _choices(), (R, R, R)),
    # the premise of claim 2 fails (gshard_x1.5 = gshard): claim 2 untestable, the others decided
    (_runs({**GOOD, "gshard_x1.5": 2.30}), _choices(), (R, T, R)),
])
def test_decision_rules(runs, choices, expected):
    report = _load("report")
    v = report.verdicts(runs, choices)
    assert tuple(v[c]["verdict"] for c in "123") == expected
    assert v["3"]["sizes"]["d128"]["outcome"] == "not run"   # no dense model at d128


def test_rule_statistics_by_hand():
    report = _load("report")
    runs = _runs(SOME, sizes=("d64",))
    of = lambda l: [r for r in runs if r["layout"] == l]  # noqa: E731
    c1 = report.claim_1(of, _choices()["d64"])
    assert c1["primary"]["mean"] == pytest.approx(-0.03 + 0.005 * (3 - 2) / 5) and c1["primary"]["negative"] == 5
    c2 = report.claim_2(of, _choices()["d64"])
    # fs - midpoint(gshard, x1.5) = 2.27 - 2.25 (+ the fs wobble); the share recovered is 0.03 / 0.10
    assert c2["primary"]["per_seed"][0] == pytest.approx(0.02 + 0.005)
    assert c2["share_recovered"] == pytest.approx((0.03 - 0.001) / 0.10)
    assert report.gap_statistic(1.0)(_rec("d64", "fine_shared", 0, 2.2), _rec("d64", "gshard", 0, 2.3),
                                     _rec("d64", "dense", 0, 2.1)) == pytest.approx(0.1)
    assert report.combine([R, N]) == P and report.combine([R, T]) == R and report.combine([T, "not run"]) == T
    assert report.combine(["not run"]) == "not run" and report.combine([N, N]) == N


def test_resolution_control_only_for_inconclusive_results():
    report = _load("report")
    wide_decisive = {"ci95": [-0.20, -0.08]}
    wide_open, narrow_open = {"ci95": [-0.05, +0.03]}, {"ci95": [-0.02, +0.01]}
    assert report.resolution_control(wide_decisive)["passes"]
    assert report.resolution_control({"ci95": [0.01, 0.15]})["passes"]
    assert not report.resolution_control(wide_open)["passes"]
    assert report.resolution_control(narrow_open)["passes"]
    assert not report.resolution_control({"ci95": None})["passes"]


def test_summary_and_tables():
    report = _load("report")
    runs = _runs(GOOD)
    select = [_sel(lr, 100, 2.3 + abs(math.log2(lr / 2e-3)) / 10, size=s, layout=l)
              for s, ls in LAYOUTS.items() for l in ls for lr in (1e-3, 2e-3, 4e-3)]
    allowed = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
    summary = report.summarize(runs, select, {"d64": allowed, "d128": allowed}, [100])
    assert summary["selection"]["d128"]["fine_shared"]["lr"] == 2e-3
    assert summary["verdicts"]["1"]["verdict"] == R
    assert "d64 fine_shared - gshard at 0.125" in summary["redundancy"]
    json.dumps(summary)
    assert "| d128 | gshard_x1.5 | 0.002 |" in report.table(summary)
    assert "| d64 | dense | 2.4000 | 2.3000 | 2.4000 | 0.002 | no |" in report.selection_table(summary)
    assert "| **(2) verdict** | all | **reproduced** |" in report.verdict_table(summary)


# ------------------------------------------------------------------------------------- run.py
def test_ngram_baselines_by_hand():
    run = _load("run")
    train = np.array([1, 2, 1, 2, 1], np.uint8)
    batch = {"tokens": np.array([[1, 2, 9]]), "mask": np.array([[1.0, 0.0]])}   # one real target: 2 after 1
    out = run.ngram_losses(train, [batch])
    assert out["unigram"] == pytest.approx(-math.log(3 / (5 + 256)))
    assert out["bigram"] == pytest.approx(-math.log(3 / (2 + 256)))      # 1 -> 2 twice, out of 2 bigrams from 1


def test_registered_stages_with_a_fake_trainer(tmp_path, monkeypatch):
    """Stage 1 picks each layout's learning rate on the selection seeds (extending the grid at an edge), stage 2
    runs the comparison seeds at it; no training (sweep.run_all replaced)."""
    run, config = _load("run"), _load("config")
    monkeypatch.setattr(sweep, "code_version", lambda: {"git_commit": "abc", "dirty": False, "dirty_paths": []})
    grid = config.LR_GRID["d128"]
    best = {"gshard": grid[1], "fine_shared": 2 * grid[-1]}   # fine_shared's best lies beyond the grid's upper edge
    calls = []

    def fake_run_all(args, experiment, config_lib, variants, seeds, results, command, measure, after=None):
        for variant in variants:
            size, layout, lr = config_lib.parse_variant(variant)
            for seed in seeds:
                calls.append((variant, seed))
                loss = 2.3 + 0.05 * abs(math.log2(lr / best[layout])) + 0.01 * seed
                rec = _rec(size, layout, seed, loss)
                rec.update(variant=variant, lr=lr)
                (results / f"{variant}_seed{seed}.json").write_text(json.dumps(rec))
        return []

    monkeypatch.setattr(sweep, "run_all", fake_run_all)
    summary = run.main(["--preset=registered", "--variants=d128-gshard,d128-fine_shared", f"--results={tmp_path}",
                        f"--workdir={tmp_path / 'work'}", "--compile_cache="])
    sel = config.SELECT_SEEDS["registered"][0]
    name = config.variant_name
    assert [c for c in calls if c[1] == sel] == (
        [(name("d128", "gshard", lr), sel) for lr in grid]
        + [(name("d128", "fine_shared", lr), sel) for lr in (*grid, 2 * grid[-1])])
    assert [c for c in calls if c[1] != sel] == (
        [(name("d128", "gshard", grid[1]), s) for s in config.SEEDS["registered"]]
        + [(name("d128", "fine_shared", 2 * grid[-1]), s) for s in config.SEEDS["registered"]])
    assert summary["selection"]["d128"]["gshard"]["lr"] == grid[1]
    choice = summary["selection"]["d128"]["fine_shared"]
    assert choice["lr"] == 2 * grid[-1] and choice["at_edge"]   # the extended grid ends there: the lr control fails
    assert summary["verdicts"]["1"]["sizes"]["d128"]["outcome"] == T
    assert (tmp_path / "summary.json").exists() and (tmp_path / "compare").is_dir()
    # --table reads the same JSONs without running anything
    calls.clear()
    again = run.main(["--preset=registered", "--table", f"--results={tmp_path}", "--compile_cache="])
    assert not calls and again["selection"] == json.loads(json.dumps(summary["selection"]))
