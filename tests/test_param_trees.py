"""Every shipped config and experiment preset builds the same variable tree as recorded (``tests/param_trees.py``):
a library change that alters what a config builds is deliberate, regenerates the record and says so."""
import json

import param_trees


def test_every_config_builds_its_recorded_variable_tree():
    recorded = json.loads(param_trees.RECORD.read_text())
    now = param_trees.record()
    assert sorted(now) == sorted(recorded), (
        f"configs added {sorted(set(now) - set(recorded))} / removed {sorted(set(recorded) - set(now))}: "
        f"run python tests/param_trees.py --write")
    changed = [name for name in now if now[name] != recorded[name]]
    assert not changed, (f"{len(changed)} config(s) build a different variable tree, first {changed[0]!r} "
                         f"(python tests/param_trees.py --show={changed[0]!r}); if deliberate, --write the record")
