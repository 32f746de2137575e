"""moejax.sweep.run_all: a preempted run is never recorded as a finished one."""
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
