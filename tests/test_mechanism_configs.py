"""Every example config in configs/mechanisms/ trains (2 steps, shrunk) and evaluates through the real trainer.

The configs are MLP classifiers on ``digits``, except ``hash_lm`` (a Transformer LM on ``stdlib_bytes``, whose
token ids reach its hash layers).

One run per config for the whole suite: the mechanisms' own tests check their numbers; this file checks that
each config file is valid and that its mechanism runs end to end in ``train_and_evaluate`` (routers, layers,
the k schedule, the two-pass consistency step, the entropy loss).
"""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from moejax.routing import smoe_dropout_k
from moejax.training import train_and_evaluate

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "mechanisms").glob("*.py"))
# Configs whose mechanism is a relation between layers keep all their layers; the others are cut to their first
# layer (compilation dominates these runs, and it grows with the number of MoE layers).
MULTI_LAYER = {"dynamoe", "moe_plus_plus"}


def load_config(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("mech_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_the_glob_finds_the_example_configs():
    names = {p.stem for p in CONFIGS}
    assert {"sinkhorn", "soft_moe", "top_p", "hash", "hash_lm", "thor", "smoe_dropout", "noise"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_mechanism_config_trains_two_steps(path, tmp_path, data_dir):
    cfg = load_config(path)
    cfg.data.data_dir = data_dir
    cfg.data.eval_batch_size = 64
    cfg.model.d_model = 16
    if cfg.model.kind == "transformer_lm":      # one narrow block on short sequences
        cfg.model.update({"num_layers": 1, "num_heads": 2})
        cfg.model.moe.hidden_dim = 16
        cfg.data.update({"batch_size": 8, "eval_batch_size": 8, "seq_len": 16})
        num_layers = 1
    else:
        if path.stem not in MULTI_LAYER:
            cfg.model.layers = cfg.model.layers[:1]
        for layer in cfg.model.layers:
            layer["hidden_dim"] = 16
        num_layers = len(cfg.model.layers)
    cfg.optimizer.schedule = "constant"
    cfg.train.update({"steps": 2, "log_every": 1, "eval_every": 1000, "checkpoint_every": 1000, "eval_steps": 1,
                      "tensorboard": False})
    result = train_and_evaluate(cfg, tmp_path)
    assert result["step"] == 2 and np.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0
    assert len(result["expert_load"]) == num_layers
    train = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    if cfg.train.get("moe_k_start") is not None:    # the scheduled k of each step is logged
        want = [smoe_dropout_k(step, 2, cfg.train.moe_k_start, cfg.train.moe_k_end) for step in (0, 1)]
        assert [r["moe_k"] for r in train] == want
    if cfg.train.get("consistency_weight", 0.0) > 0:   # THOR's two passes of random routing disagree
        assert all(r["consistency"] > 0 for r in train)
