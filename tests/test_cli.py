"""Command-line overrides (moejax/cli.py): every field reachable, written out by the config file or not."""
from __future__ import annotations

import ml_collections
import pytest

from moejax import cli
from moejax.models import model_config


def quickstart_like() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        "model": {"kind": "mlp", "d_model": 8,
                  "layers": [{"num_experts": 4, "hidden_dim": 8, "router": {"k": 2}, "dispatch": {"mode": "dropless"}},
                             16]},
        "optimizer": {"learning_rate": 1e-3, "grad_clip_norm": 1.0},
        "train": {"steps": 10, "tensorboard": True},
    })
    config.lock()
    return config


def test_split_overrides_takes_config_paths_out_of_argv():
    rest, overrides = cli.split_overrides(["prog", "--config=a.py", "--config.train.steps=5", "--workdir=/w",
                                           "--config.model.layers[0].router.kind", "hash"])
    assert rest == ["prog", "--config=a.py", "--workdir=/w"]
    assert overrides == [("train.steps", "5"), ("model.layers[0].router.kind", "hash")]
    with pytest.raises(ValueError, match="missing value"):
        cli.split_overrides(["prog", "--config.train.steps"])
    with pytest.raises(ValueError, match="not a valid override"):
        cli.split_overrides(["prog", "--config.=3"])


def test_written_and_unwritten_fields_are_set_with_the_right_types():
    config = quickstart_like()
    cli.apply_overrides(config, [
        ("train.steps", "20"), ("optimizer.learning_rate", "1"), ("train.tensorboard", "false"),
        ("model.layers[0].router.kind", "sinkhorn"), ("model.layers[0].router.balance_iterations", "30"),
        ("model.layers[0].dispatch.capacity_factor", "2.0"), ("model.layers[0].dispatch.gmm", "padded"),
        ("optimizer.name", "lion")])
    assert config.train.steps == 20 and config.optimizer.learning_rate == 1.0
    assert isinstance(config.optimizer.learning_rate, float) and config.train.tensorboard is False
    layer = config.model.layers[0]
    assert layer["router"] == {"k": 2, "kind": "sinkhorn", "balance_iterations": 30}
    assert layer["dispatch"] == {"mode": "dropless", "capacity_factor": 2.0, "gmm": "padded"}
    assert config.optimizer.name == "lion"
    spec = model_config(config.model, num_classes=3, input_shape=(4,)).layers[0]
    assert spec.router.kind == "sinkhorn" and spec.router.balance_iterations == 30


def test_a_sub_config_can_be_replaced_by_none():
    config = ml_collections.ConfigDict({"model": {"kind": "transformer_lm", "moe": {"num_experts": 4}}})
    config.lock()
    cli.apply_overrides(config, [("model.moe", "None")])      # the dense baseline of configs/lm_tiny.py
    assert config.model.moe is None


def test_a_misspelled_field_is_created_then_refused_by_the_typed_config_naming_it():
    config = quickstart_like()
    cli.apply_overrides(config, [("model.layers[0].router.renormalise", "true")])
    with pytest.raises(ValueError, match=r"router\.renormalise: unknown field of router\.kind='topk' \(did you mean "
                                         r"'renormalize'\?\)"):
        model_config(config.model, num_classes=3, input_shape=(4,))


@pytest.mark.parametrize("path,value,match", [
    ("model.layers[5].router.k", "1", r"index 5 is out of range"),
    ("model.layers[1].k", "1", r"^model\.layers\[1\]\.k: cannot set a field inside a int"),
    ("train.steps", "true", r"^train\.steps='true': must be a number"),
    ("train.tensorboard", "3", r"^train\.tensorboard='3': must be true or false"),
    ("model..kind", "x", r"not a valid path"),
])
def test_bad_overrides_are_one_line_errors_naming_the_path(path, value, match):
    config = quickstart_like()
    with pytest.raises(ValueError, match=match):
        cli.apply_overrides(config, [(path, value)])


def test_main_prints_a_config_error_as_one_line_and_exits_2(tmp_path, data_dir):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "moejax.main", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}",
                           "--config.model.layers[0].router.renormalise=true"],
                          capture_output=True, text=True, timeout=300,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "router.renormalise: unknown field of router.kind='topk' (did you mean 'renormalize'?)" in lines[0]
