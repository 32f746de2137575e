"""The trainer end to end: tiny runs of each model kind, resume exactness, SIGKILL/SIGTERM, corrupt
checkpoints, NaN stops and config validation."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from moejax.training import Checkpointer, NonFiniteError, loop, train_and_evaluate

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("cfg_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def tiny_mlp(data_dir: str, **train) -> ml_collections.ConfigDict:
    cfg = load_config(ROOT / "configs/quickstart.py")
    cfg.data.data_dir = data_dir
    cfg.data.eval_batch_size = 128
    cfg.model.d_model = 16
    for layer in cfg.model.layers:
        layer["hidden_dim"] = 16
    cfg.optimizer.schedule = "constant"
    cfg.train.update({"steps": 12, "log_every": 4, "eval_every": 6, "checkpoint_every": 4, "keep_checkpoints": 3,
                      "eval_steps": 1, **train})
    return cfg


def final_params(workdir) -> list[np.ndarray]:
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        tree = ckpt.restore_raw()
    finally:
        ckpt.close()
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree["params"])]


def records(workdir, split):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_same_params(a, b):
    pa, pb = final_params(a), final_params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- end to end per model kind

def test_mlp_end_to_end(tmp_path, data_dir):
    result = train_and_evaluate(tiny_mlp(data_dir), tmp_path)
    assert result["step"] == 12 and not result["preempted"]
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
    assert [len(x) for x in result["expert_load"]] == [8, 4]
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [4, 8, 12]
    assert {"loss", "accuracy", "items_per_sec", "expert_load", "dropped_fraction", "loss/load_balance",
            "loss/z_loss"} <= set(train[0])
    assert len(train[0]["expert_load"]) == 2
    assert [r["step"] for r in records(tmp_path, "eval")] == [6, 12]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert Checkpointer(tmp_path).steps() == [4, 8, 12]
    assert json.loads((tmp_path / "config.json").read_text())["data"]["name"] == "digits"


def four_steps(config_file: str, data_dir: str) -> ml_collections.ConfigDict:
    """A shared config shrunk to a 4-step run with one eval batch."""
    cfg = load_config(ROOT / "configs" / config_file)
    cfg.data.data_dir = data_dir
    cfg.optimizer.schedule = "constant"
    cfg.train.update({"steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "eval_steps": 1})
    return cfg


def test_transformer_lm_end_to_end(tmp_path, data_dir):
    cfg = four_steps("lm_tiny.py", data_dir)
    result = train_and_evaluate(cfg, tmp_path)
    assert result["step"] == 4 and result["perplexity"] > 1.0
    assert len(result["expert_load"]) == cfg.model.num_layers
    # The trained workdir is a model source for generation and evaluation (byte tokenizer).
    from moejax import generate as generate_cli, lm_eval
    texts = generate_cli.run(["--model", str(tmp_path), "--prompt", "def f(", "--prompt", "import", "--max_new_tokens=3"])
    assert len(texts) == 2
    text = tmp_path / "text.txt"
    text.write_text("def main():\n    return 0\n" * 8)
    summary = lm_eval.run(["--model", str(tmp_path), "--text", str(text), "--length=16", "--max_windows=4",
                           "--out", str(tmp_path / "eval")])
    assert summary["tokens"] == 4 * 16 and summary["perplexity"] > 1.0
    usage = np.load(tmp_path / "eval" / "expert_usage.npz")
    moe_layers = [k for k in usage.files if k != "windows"]
    assert moe_layers and all(usage[k].shape[:2] == (4, 16) for k in moe_layers)
    on_tfds = lm_eval.run(["--model", str(tmp_path), "--tfds", "stdlib_bytes:validation", "--data_dir", data_dir,
                           "--length=16", "--max_windows=2"])
    assert on_tfds["tokens"] == 32 and on_tfds["perplexity"] > 1.0


def test_vit_end_to_end(tmp_path, data_dir):
    cfg = four_steps("vit_tiny.py", data_dir)
    result = train_and_evaluate(cfg, tmp_path)
    assert result["step"] == 4 and 0.0 <= result["accuracy"] <= 1.0


def test_quickstart_learns(tmp_path, data_dir):
    cfg = load_config(ROOT / "configs/quickstart.py")
    cfg.data.data_dir = data_dir
    cfg.train.update({"steps": 300, "eval_every": 300, "checkpoint_every": 300, "tensorboard": False})
    cfg.mesh.num_devices = 1   # of the suite's 8 simulated CPU devices: learning, not sharding, is tested here
    result = train_and_evaluate(cfg, tmp_path)
    assert result["accuracy"] > 0.85, result      # chance is 0.10


# ----------------------------------------------------------------------------- failures and resumption

class _Wrapped:
    """Wraps the train batcher to fail or poison a given step."""

    def __init__(self, inner, step, action):
        self.inner, self.step, self.action = inner, step, action

    def batch(self, step):
        b = self.inner.batch(step)
        if step == self.step:
            if self.action == "crash":
                raise RuntimeError(f"simulated crash at step {step}")
            b = dict(b, inputs=np.full_like(b["inputs"], np.nan))
        return b


def _patch_train_data(monkeypatch, step, action):
    real = loop.build

    def build(config):
        model, train_data, eval_data, meta = real(config)
        return model, _Wrapped(train_data, step, action), eval_data, meta

    monkeypatch.setattr(loop, "build", build)


def test_crash_and_resume_is_exact(tmp_path, data_dir, monkeypatch):
    train_and_evaluate(tiny_mlp(data_dir), tmp_path / "straight")
    with monkeypatch.context() as m:
        _patch_train_data(m, 9, "crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_and_evaluate(tiny_mlp(data_dir), tmp_path / "resumed")
    assert Checkpointer(tmp_path / "resumed").steps() == [4, 8]
    result = train_and_evaluate(tiny_mlp(data_dir), tmp_path / "resumed")
    assert result["step"] == 12
    assert_same_params(tmp_path / "straight", tmp_path / "resumed")
    assert [r["step"] for r in records(tmp_path / "resumed", "train")] == [4, 8, 12]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    _patch_train_data(monkeypatch, 6, "nan")
    with pytest.raises(NonFiniteError, match="step 6: non-finite loss") as err:
        train_and_evaluate(tiny_mlp(data_dir), tmp_path)
    assert "Last good checkpoint: 4" in str(err.value)
    assert Checkpointer(tmp_path).steps() == [4]


# A corrupt newest checkpoint and a checkpoint of another model: tests/test_trainer_safety.py
# (test_flipped_bit_and_garbage_are_quarantined_and_the_run_falls_back, test_swapped_layers_are_a_different_model_not_
# corruption). Data parallelism over 8 devices equal to one device: tests/test_sharded_training.py (one sharded
# step per mesh layout equals the single-device step; a checkpoint restores onto another mesh and training goes on).


def _main_cmd(workdir, data_dir, *overrides):
    return [sys.executable, "-m", "moejax.main", f"--config={ROOT / 'configs/quickstart.py'}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.model.d_model=16", "--config.optimizer.schedule=constant",
            "--config.train.tensorboard=False", *overrides]


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


# SIGKILL and restart: tests/test_trainer_safety.py's chaos test (three random SIGKILLs and a corrupted checkpoint
# in one run, ending bit-identical to an uninterrupted run) covers what a single kill here did.


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, data_dir):
    overrides = ("--config.train.steps=100000", "--config.train.checkpoint_every=100000", "--config.train.log_every=2",
                 "--config.train.eval_every=100000")
    proc = subprocess.Popen(_main_cmd(tmp_path, data_dir, *overrides), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143
    steps = Checkpointer(tmp_path).steps()
    assert len(steps) == 1 and steps[0] >= 4
    assert f"preempted at step {steps[0]}" in out


def test_batch_size_must_divide_over_devices(tmp_path, data_dir):
    cfg = tiny_mlp(data_dir)
    cfg.data.batch_size = 12          # 8 simulated devices in the test session
    with pytest.raises(ValueError, match="data.batch_size=12: must be divisible by the 8 token shards"):
        train_and_evaluate(cfg, tmp_path)


# ----------------------------------------------------------------------------- validation before compilation

@pytest.mark.parametrize("path,value,message", [
    ("train.steps", 0, "train.steps=0"),
    ("train.warmup", 3, "train.warmup: unknown field"),
    ("optimizer.name", "adagrad", "optimizer.name='adagrad'"),
    ("optimizer.learning_rate", -1.0, "optimizer.learning_rate=-1.0"),
    ("data.batch_size", 0, "data.batch_size=0"),
    ("data.name", "no_such_dataset_xyz", "data.name='no_such_dataset_xyz'"),
    ("model.d_model", 0, "model.d_model=0"),
    ("model.kind", "rnn", "model.kind='rnn'"),
])
def test_config_errors_name_the_field(tmp_path, data_dir, path, value, message):
    cfg = tiny_mlp(data_dir)
    section, field = path.split(".")
    cfg[section][field] = value
    with pytest.raises(ValueError) as err:
        train_and_evaluate(cfg, tmp_path)
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "checkpoints").exists()
