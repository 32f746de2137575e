"""experiments/deep_moe, the untrained control (issue 17): the decision rule on synthetic records, the routed
distribution, the untrained analysis on the tiny preset, that it is the trainer's exact step-0 state, and the
refusal to run the registered preset from a dirty tree."""
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from moejax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    return sweep.load_sibling(str(ROOT / "deep_moe" / "run.py"), "deep_moe", name)   # run.py's own names


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


# ---- synthetic records ----

def _layer(position: float, klass: float, sd: float = 0.005, usage=(0.25, 0.25, 0.25, 0.25)) -> dict:
    row = {"top1_usage": list(usage)}
    for label, value in (("position", position), ("class", klass), ("quadrant", 0.0)):
        row[f"mi_{label}_routed_corrected"] = value
        row[f"mi_{label}_routed_null_std"] = sd
        row[f"mi_{label}_hard_corrected"] = value
        row[f"mi_{label}_soft_corrected"] = value
    return row


def _record(seed: int, untrained: tuple, trained: tuple, variant: str = "dense", accuracy: float = 0.8,
            sd: float = 0.005, usage=(0.25, 0.25, 0.25, 0.25)) -> dict:
    """``untrained``/``trained``: ((layer-1 position, layer-1 class), (layer-2 position, layer-2 class))."""
    return {"variant": variant, "seed": seed, "final_eval": {"accuracy": accuracy}, "wall_clock_s": 1.0,
            "untrained_eval": {"accuracy": 0.1},
            "gating_untrained": [_layer(*untrained[0], sd=sd), _layer(*untrained[1], sd=sd)],
            "gating": [_layer(*trained[0], sd=sd, usage=usage), _layer(*trained[1], sd=sd, usage=usage)]}


def _runs(untrained, trained, n=5, **kw):
    return [_record(s, untrained, trained, **kw) for s in range(n)]


def test_floor_and_paired_statistics():
    run = _load("run")
    r = _record(0, ((0.0, 0.0), (0.0, 0.0)), ((0.3, 0.0), (0.0, 0.3)), sd=0.03)
    assert run.floor(r, 1, "position") == pytest.approx(2 * math.hypot(0.03, 0.03))
    assert run.floor(_record(0, ((0, 0), (0, 0)), ((0, 0), (0, 0)), sd=0.0), 1, "position") == run.MIN_EFFECT
    assert run.change(r, 1, "position") == pytest.approx(0.3) and run.min_seeds(5) == 4 and run.min_seeds(3) == 3
    p = run.paired([0.1, 0.2, 0.3, -0.1, 0.0])
    assert (p["up"], p["down"], p["n"]) == (3, 1, 5) and p["mean"] == pytest.approx(0.1)
    assert p["std"] == pytest.approx(np.std([0.1, 0.2, 0.3, -0.1, 0.0], ddof=1))
    assert p["ci95"] == pytest.approx(sweep.ci95([0.1, 0.2, 0.3, -0.1, 0.0]))


def test_rule_reproduced_when_training_creates_both_factors():
    run = _load("run")
    runs = _runs(((0.0, 0.0), (0.0, 0.0)), ((0.3, 0.01), (0.02, 0.4)))
    v = run.verdicts(runs)["dense"]
    assert v["controls"]["pass"] and v["primary"]
    assert v["where"]["outcome"] == v["what"]["outcome"] == v["claim"] == "reproduced"
    assert v["where"]["learned_seeds"] == 5 and v["what"]["specific_seeds"] == 5


def test_rule_partly_when_the_factor_was_there_at_initialisation():
    """Layer 1 about position already at step 0 and not more so after training: specific, not learned."""
    run = _load("run")
    runs = _runs(((0.6, 0.0), (0.0, 0.0)), ((0.6, 0.01), (0.0, 0.4)))
    v = run.verdicts(runs)["dense"]
    assert v["where"]["specific"] and not v["where"]["learned"]
    assert v["where"]["outcome"] == "partly reproduced" and v["what"]["outcome"] == "reproduced"
    assert v["claim"] == "partly reproduced"


def test_rule_not_reproduced_when_training_lowers_it_or_raises_the_other_label():
    run = _load("run")
    # Layer 1 loses position information in training and ends about class; layer 2 gains position, not class.
    runs = _runs(((0.6, 0.0), (0.0, 0.0)), ((0.1, 0.3), (0.5, 0.05)))
    v = run.verdicts(runs)["dense"]
    assert v["where"]["outcome"] == v["what"]["outcome"] == v["claim"] == "not reproduced"
    assert v["where"]["change_target"]["down"] == 5
    # Both labels rise equally: learned_s fails on the contrast, and the trained gap is below the floor.
    runs = _runs(((0.0, 0.0), (0.0, 0.0)), ((0.2, 0.2), (0.2, 0.2)))
    assert run.factor_outcome(runs, "where")["outcome"] == "not reproduced"


def test_rule_needs_four_of_five_seeds_and_a_change_above_the_floor():
    run = _load("run")
    good = ((0.0, 0.0), (0.0, 0.0)), ((0.3, 0.0), (0.0, 0.3))
    bad = ((0.0, 0.0), (0.0, 0.0)), ((0.0, 0.0), (0.0, 0.0))
    three = [_record(s, *(good if s < 3 else bad)) for s in range(5)]
    assert run.factor_outcome(three, "what")["outcome"] == "not reproduced"
    four = [_record(s, *(good if s < 4 else bad)) for s in range(5)]
    assert run.factor_outcome(four, "what")["outcome"] == "reproduced"
    # A change of 0.1 bits is inside a floor of 2 * hypot(0.06, 0.06) = 0.17 bits: not learned, not specific.
    small = _runs(((0.0, 0.0), (0.0, 0.0)), ((0.0, 0.0), (0.0, 0.1)), sd=0.06)
    out = run.factor_outcome(small, "what")
    assert out["learned_seeds"] == 0 and out["outcome"] == "not reproduced"
    # ... and the resolution control fails (shuffle std 0.06 > MAX_FLOOR): not testable here.
    assert run.verdicts(small)["dense"]["what"]["outcome"] == "not testable here"


def test_failed_controls_give_not_testable_here():
    run = _load("run")
    good = ((0.0, 0.0), (0.0, 0.0)), ((0.3, 0.0), (0.0, 0.3))
    untrained_model = run.verdicts(_runs(*good, accuracy=0.2))["dense"]
    assert not untrained_model["controls"]["trained"] and untrained_model["claim"] == "not testable here"
    collapsed = run.verdicts(_runs(*good, usage=(0.97, 0.01, 0.01, 0.01)))["dense"]
    assert not collapsed["controls"]["alive"] and collapsed["where"]["outcome"] == "not testable here"
    assert run.combine("reproduced", "not reproduced") == "partly reproduced"
    assert run.combine("not testable here", "reproduced") == "not testable here"


def test_summary_and_table_carry_the_control():
    run = _load("run")
    runs = _runs(((0.0, 0.0), (0.0, 0.0)), ((0.3, 0.0), (0.0, 0.3))) + \
        _runs(((0.6, 0.0), (0.0, 0.0)), ((0.6, 0.0), (0.0, 0.3)), variant="top1")
    summary = run.summarize(runs)
    assert summary["top1"]["change"]["layer1_position"]["mean"] == pytest.approx(0.0)
    assert summary["dense"]["change"]["layer2_class"]["up"] == 5
    assert summary["verdicts"]["top1"]["where"]["outcome"] == "partly reproduced" and not \
        summary["verdicts"]["top1"]["primary"]
    text = run.table(summary)
    assert "| top1 | 1 | position | 0.600 ± 0.000 | 0.600 ± 0.000 |" in text
    assert "**dense** (primary)" in text
    # Records of the uncontrolled sweep (no gating_untrained) still summarise, without a change or a verdict.
    old = [{k: v for k, v in r.items() if k not in ("gating_untrained", "untrained_eval")} for r in runs]
    assert "verdicts" not in run.summarize(old) and "change" not in run.summarize(old)["dense"]


def test_routed_distribution():
    analysis = _load("analysis")
    g = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    np.testing.assert_allclose(analysis.routed_distribution(g, 4), g)
    np.testing.assert_allclose(analysis.routed_distribution(g, 1), [[0, 0, 0, 1], [1, 0, 0, 0]])
    np.testing.assert_allclose(analysis.routed_distribution(g, 2), [[0, 0, 3 / 7, 4 / 7], [4 / 7, 3 / 7, 0, 0]])
    rng = np.random.RandomState(0)
    gates = rng.dirichlet(np.ones(4), size=200)
    labels = rng.randint(0, 5, size=200)
    assert analysis.soft_mutual_information(analysis.routed_distribution(gates, 1), labels, 5) == pytest.approx(
        analysis.hard_mutual_information(gates, labels, 5))


# ---- the untrained analysis on the tiny preset ----

def test_untrained_analysis_runs_on_tiny_and_is_the_trainers_step0_state(tmp_path):
    run = _load("run")
    config_lib = _load("config")
    out = run.main(["--preset=tiny", "--untrained_only", "--variants=top1", f"--results={tmp_path / 'pilot'}",
                    f"--workdir={tmp_path / 'work'}"])
    record = json.loads((tmp_path / "pilot" / "top1_seed0.json").read_text())
    assert out["runs"][0]["seed"] == 0 and record["untrained_only"] and "gating" not in record
    assert len(record["gating_untrained"]) == 2 and 0.0 <= record["untrained_eval"]["accuracy"] <= 0.3
    for layer in record["gating_untrained"]:
        assert layer["k"] == 1 and layer["mean_gate_entropy"] > 1.95   # a fresh router: nearly uniform gates
        assert -0.05 < layer["mi_position_soft_corrected"] < 0.01       # ... so its soft MI is ~0
        assert layer["mi_position_routed_null_std"] >= 0.0
    assert (tmp_path / "pilot" / "table.md").read_text().count("| top1 | 0 |") == 1

    # Exactness: with warmup from lr = 0 the trainer's first update is zero, so its step-1 checkpoint holds the
    # step-0 parameters, which must equal untrained_variables' bit for bit.
    from moejax.training import train_and_evaluate
    from moejax.training.checkpoint import read_checkpoint
    config = config_lib.get_config("tiny,top1")
    config.seed = config.data.seed = 3
    config.train.steps, config.train.checkpoint_every, config.train.eval_every = 2, 1, 2
    config.train.keep_checkpoints, config.optimizer.warmup_steps = 2, 1
    train_and_evaluate(config, tmp_path / "train")
    state, step = read_checkpoint(tmp_path / "train", step=1)
    assert step == 1
    mine = run.untrained_variables(config)["params"]
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), mine,
                                  state["params"])
    assert all(jax.tree_util.tree_leaves(same))
    config.seed = 4
    other = run.untrained_variables(config)["params"]
    assert not np.array_equal(np.asarray(other["input"]["kernel"]), np.asarray(mine["input"]["kernel"]))
