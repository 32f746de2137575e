"""Smoke tests of the experiment directories: the ``tiny`` preset of each sweep end to end, plus the
paper-specific analysis code (mutual information of gates, the redundancy test's masked routing) on
hand-computed cases, and every preset/variant config validated without training."""
import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import RouterConfig
from moejax.models import model_config

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(experiment: str, name: str):
    full = f"{experiment}_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, ROOT / experiment / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def test_deep_moe_tiny_sweep_end_to_end(tmp_path):
    run = _load("deep_moe", "run")
    summary = run.main(["--preset=tiny", "--variants=dense", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "dense_seed0.json").read_text())
    assert record["seed"] == 0 and record["variant"] == "dense" and record["jax_version"] == jax.__version__
    assert 0.0 <= record["final_eval"]["accuracy"] <= 1.0 and record["final_eval"]["step"] == 20
    assert len(record["gating"]) == 2
    for layer in record["gating"]:
        assert layer["num_experts"] == 4 and math.isclose(sum(layer["top1_usage"]), 1.0, abs_tol=1e-9)
        for key in ("mi_quadrant_hard", "mi_position_hard", "mi_class_hard", "mi_quadrant_soft", "mi_class_soft"):
            assert -1e-9 <= layer[key] <= 2.0 + 1e-9  # log2(4 experts) bounds every MI here
    assert record["params"]["total"] == record["params"]["active"]  # dense mixture: k = E
    assert (tmp_path / "results" / "gating_dense.png").stat().st_size > 0
    assert summary["dense"]["seeds"] == [0]


def test_deepseekmoe_tiny_sweep_end_to_end(tmp_path):
    run = _load("deepseekmoe", "run")
    summary = run.main(["--preset=tiny", "--variants=fine_shared", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "fine_shared_seed0.json").read_text())
    assert record["final_eval"]["step"] == 10 and math.isfinite(record["final_eval"]["loss"])
    assert record["config"]["model"]["moe"]["num_experts"] == 31
    red = record["redundancy"]
    assert set(red) == {"0.125", "0.250", "unmasked_loss"}
    assert all(math.isfinite(red[k]["increase"]) for k in ("0.125", "0.250"))
    # The unmasked loss of the redundancy evaluation is the trainer's own evaluation on the same batches.
    assert red["unmasked_loss"] == pytest.approx(record["final_eval"]["loss"], rel=1e-4)
    assert summary["fine_shared"]["params"] == record["params"]


def test_mutual_information_hand_computed():
    analysis = _load("deep_moe", "analysis")
    labels = np.repeat(np.arange(4), 25)
    onehot = np.eye(4)[labels]
    # Gates determined by the label: both MIs equal H(label) = 2 bits.
    assert analysis.hard_mutual_information(onehot, labels, 4) == pytest.approx(2.0)
    assert analysis.soft_mutual_information(onehot, labels, 4) == pytest.approx(2.0)
    # Uniform gates carry no information; argmax of constant gates is a constant.
    uniform = np.full((100, 4), 0.25)
    assert analysis.soft_mutual_information(uniform, labels, 4) == pytest.approx(0.0, abs=1e-12)
    assert analysis.hard_mutual_information(uniform, labels, 4) == pytest.approx(0.0, abs=1e-12)
    # Two experts, each used by half of the labels with confidence 3/4: soft MI = 1 - H(3/4) bits.
    soft = np.where(labels[:, None] < 2, [0.75, 0.25], [0.25, 0.75])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert analysis.soft_mutual_information(soft, labels, 4) == pytest.approx(1.0 - h)
    assert analysis.hard_mutual_information(soft, labels, 4) == pytest.approx(1.0)
    maps = analysis.position_maps(onehot, np.stack([labels, labels], 1))
    assert maps.shape == (4, 17, 17) and maps[2, 2, 2] == 1.0 and np.isnan(maps[0, 0, 1])


def test_redundancy_masking_skips_each_tokens_top_experts():
    redundancy = _load("deepseekmoe", "redundancy")
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    cfg = RouterConfig(k=2)
    routing = redundancy.masked_routing(logits, 2, 1, cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.expert_index), -1), [[1, 2], [1, 2]])
    # Weights stay the unmasked softmax scores of the chosen experts (not renormalised by this config).
    np.testing.assert_allclose(np.sort(np.asarray(routing.weight), -1), [[0.2, 0.3], [0.2, 0.3]], rtol=1e-5)


@pytest.mark.parametrize("experiment,shape", [("deep_moe", (24, 24, 1)), ("deepseekmoe", None)])
def test_every_preset_and_variant_config_is_valid(experiment, shape):
    config = _load(experiment, "config")
    for preset in config.PRESETS:
        for variant in config.VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            typed = model_config(cfg.model, num_classes=10, vocab_size=256, input_shape=shape)
            assert cfg.train.steps >= 1 and typed is not None
    with pytest.raises(ValueError, match="^preset="):
        config.get_config("huge")
    with pytest.raises(ValueError, match="^variant="):
        config.get_config("tiny,nope")
