"""moejax.sweep: a preempted run is never recorded as a finished one; the paired statistics of the decision rules."""
import argparse
import types

import pytest

from moejax import sweep


def test_preempted_run_is_not_recorded_and_stops_the_sweep(tmp_path, monkeypatch):
    import moejax.training.loop as loop

    calls = []

    def fake_train(config, workdir):
        calls.append(str(workdir))
        return {"step": 7, "preempted": True}

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)

    def get_config(spec):
        return types.SimpleNamespace(seed=None, data=types.SimpleNamespace(seed=None))

    config_lib = types.SimpleNamespace(get_config=get_config)
    args = argparse.Namespace(preset="tiny", workdir=str(tmp_path / "work"))
    results = tmp_path / "results"
    results.mkdir()

    def measure(**kwargs):  # never reached: nothing is measured for a preempted run
        raise AssertionError("measured a preempted run")

    with pytest.raises(SystemExit) as exit_info:
        sweep.run_all(args, "demo", config_lib, ["a", "b"], [0, 1], results, "cmd", measure)
    assert exit_info.value.code == 143
    assert len(calls) == 1                          # the sweep stopped at the first (preempted) run
    assert not list(results.glob("*.json"))         # and recorded nothing


def test_paired_statistics_and_clearly():
    a = [{"seed": s, "x": v} for s, v in enumerate([1.0, 2.0, 3.0, 4.0])]
    b = [{"seed": s, "x": 0.0} for s in (1, 2, 3, 9)]
    p = sweep.paired([a, b], lambda u, v: u["x"] - v["x"])
    assert p["seeds"] == [1, 2, 3] and p["per_seed"] == [2.0, 3.0, 4.0] and p["n"] == 3
    assert p["mean"] == 3.0 and p["std"] == 1.0 and p["positive"] == 3 and p["negative"] == 0
    assert p["ci95"][0] == pytest.approx(3.0 - 4.302653 / 3 ** 0.5, rel=1e-5)
    assert sweep.clearly(p, +1, 0.7) and not sweep.clearly(p, -1, 0.7)
    assert sweep.paired([a, [{"seed": 7, "x": 0}]], lambda u, v: 0.0) is None
    # one seed has no interval; a share not met is not clear even with an interval above 0
    assert not sweep.clearly(sweep.paired([a[:1], a[:1]], lambda u, v: 1.0), +1, 0.7)
    mixed = {"n": 5, "positive": 3, "negative": 2, "ci95": [0.1, 0.5]}
    assert not sweep.clearly(mixed, +1, 0.7) and sweep.clearly(mixed, +1, 0.6)
    assert "3 up / 0 down of 3" in sweep.format_paired(p) and sweep.format_paired(None) == "not run"


def test_resolution_control_and_outcome_if_controls_pass():
    assert sweep.resolution_control({"ci95": [-0.20, -0.08]}, 0.03)["passes"]        # decisive, however wide
    assert not sweep.resolution_control({"ci95": [-0.05, 0.03]}, 0.03)["passes"]     # inconclusive and wide
    assert sweep.resolution_control({"ci95": [-0.02, 0.01]}, 0.03)["passes"]         # inconclusive, resolved
    assert not sweep.resolution_control(None, 0.03)["passes"]
    ok, bad = {"a": {"passes": True}}, {"a": {"passes": True}, "b": {"passes": False}}
    assert sweep.outcome_if_controls_pass(ok, lambda: "reproduced") == "reproduced"
    assert sweep.outcome_if_controls_pass(bad, lambda: "reproduced") == "not testable here"
