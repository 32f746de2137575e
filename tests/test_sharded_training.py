"""Sharded training on 8 simulated CPU devices: one train step on several meshes equals the single-device step;
checkpoints restore onto another mesh; two processes joined by ``jax.distributed`` match one process."""
import functools
import pathlib
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moejax import parallel
from moejax.parallel import launch
from moejax.training import loop, optim
from moejax.training.checkpoint import Checkpointer
from moejax.training.config import mesh_config, optimizer_config, train_config
from moejax.training.steps import make_train_step, split_batch
from trees import assert_trees_close

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = {
    "data8": dict(data=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def lm_config(data_dir: str, mode: str = "dropless", skewed: bool = False, steps: int = 1,
              mesh: dict | None = None) -> ml_collections.ConfigDict:
    """A tiny MoE LM (8 experts top-2, GLU, one shared expert) trained with SGD, so updates are linear in grads."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.data = ml_collections.ConfigDict({"name": "stdlib_bytes", "batch_size": 8, "eval_batch_size": 8,
                                          "seq_len": 16, "seed": 0, "data_dir": data_dir})
    cfg.model = ml_collections.ConfigDict({
        "kind": "transformer_lm", "d_model": 16, "num_layers": 1, "num_heads": 2, "moe_every": 1,
        "moe": {"num_experts": 8, "hidden_dim": 16, "expert_kind": "glu", "activation": "silu", "use_bias": False,
                "num_shared_experts": 1,
                "router": {"k": 2, "renormalize": True, "selection_bias": skewed, "bias_update_rate": 0.0},
                "dispatch": {"mode": mode, "capacity_factor": 1.0, "groups": 8 if mode == "capacity" else 1,
                             "gmm": "padded", "gmm_tile": 8}},      # dropless has no routing groups
    })
    cfg.optimizer = optimizer_config(name="sgd", learning_rate=0.5, schedule="constant")
    cfg.train = train_config(steps=steps, log_every=1, eval_every=steps, checkpoint_every=2, eval_steps=1,
                             tensorboard=False, async_checkpoints=False)
    cfg.mesh = mesh_config(**(mesh or {}))
    return cfg


def skew(moe_state):
    """Selection bias that sends every token's two copies to experts 0 and 1 (one expert device)."""
    bias = jnp.array([10.0, 10.0] + [0.0] * 6)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: bias if "selection_bias" in jax.tree_util.keystr(path) else v, moe_state)


def one_step(cfg, mesh_shape: dict | None, skewed: bool):
    """(loss, updated params) of one train step, on one device (mesh_shape None) or sharded over a mesh."""
    model, train_data, _, meta = loop.build(cfg)
    tx = optim.make_optimizer(cfg.optimizer, 1)
    batch = train_data.batch(0)
    inputs, _ = split_batch(batch, meta.task)
    step = make_train_step(model, tx, meta.task)
    if mesh_shape is None:
        state, _ = loop.init_state(model, tx, jnp.asarray(inputs), 0)
        if skewed:
            state = state.replace(moe_state=skew(state.moe_state))
        new, metrics = jax.jit(step)(state, batch)
        return float(metrics["loss"]), jax.device_get(new.params)
    mesh = parallel.make_mesh(parallel.MeshConfig(**mesh_shape))
    rules = parallel.DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = loop.init_state(model, tx, jnp.asarray(inputs), 0, mesh, rules)
        if skewed:
            state = state.replace(moe_state=jax.device_put(skew(state.moe_state), NamedSharding(mesh, PartitionSpec())))
        bs = parallel.batch_sharding(mesh)
        fn = jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())))
        new, metrics = fn(state, {k: jax.device_put(v, bs) for k, v in batch.items()})
        if mesh.shape["expert"] > 1:                 # the experts really are split over the expert axis
            w_gate = [v for p, v in jax.tree_util.tree_leaves_with_path(new.params)
                      if "experts" in jax.tree_util.keystr(p) and "w_gate" in jax.tree_util.keystr(p)]
            assert w_gate and all(w.sharding.spec[0] == "expert" for w in w_gate)
        return float(metrics["loss"]), jax.device_get(new.params)


@functools.lru_cache(maxsize=None)
def single_device(data_dir: str, mode: str, skewed: bool):
    return one_step(lm_config(data_dir, mode, skewed), None, skewed)


CASES = [("data8", "capacity", True), ("data2_expert4", "capacity", True), ("data2_expert4", "dropless", True),
         ("fsdp2_expert2_tensor2", "capacity", False), ("fsdp2_expert2_tensor2", "dropless", True)]


@pytest.mark.parametrize("mesh_name,mode,skewed", CASES,
                         ids=[f"{m}-{mode}-{'skewed' if s else 'balanced'}" for m, mode, s in CASES])
def test_one_sharded_step_equals_the_single_device_step(data_dir, mesh_name, mode, skewed):
    want_loss, want = single_device(data_dir, mode, skewed)
    loss, got = one_step(lm_config(data_dir, mode, skewed), MESHES[mesh_name], skewed)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(got, want, rtol=1e-4, atol=2e-6)


def final_params(workdir: pathlib.Path):
    return Checkpointer(workdir).restore_raw()["params"]


def test_checkpoint_restores_onto_another_mesh_and_training_continues(tmp_path, data_dir):
    big = dict(data=2, expert=4)
    loop.train_and_evaluate(lm_config(data_dir, steps=4, mesh=big), tmp_path / "straight")
    loop.train_and_evaluate(lm_config(data_dir, steps=2, mesh=big), tmp_path / "moved")
    # Same workdir, 2 devices as data=1 x expert=2: the step-2 checkpoint is restored onto the new mesh.
    result = loop.train_and_evaluate(lm_config(data_dir, steps=4, mesh=dict(data=1, expert=2, num_devices=2)),
                                     tmp_path / "moved")
    assert result["step"] == 4
    assert_trees_close(final_params(tmp_path / "moved"), final_params(tmp_path / "straight"), rtol=1e-4, atol=1e-5)


def test_mesh_errors_are_raised_before_compiling(tmp_path, data_dir):
    cfg = lm_config(data_dir, mesh=dict(data=2, expert=4))
    cfg.data.batch_size = 4
    with pytest.raises(ValueError, match=r"^data\.batch_size=4: must be divisible by the 8"):
        loop.train_and_evaluate(cfg, tmp_path)
    cfg = lm_config(data_dir, mode="capacity", mesh=dict(data=2, expert=4))
    cfg.model.moe.dispatch.groups = 4
    with pytest.raises(ValueError, match=r"dispatch\.groups=4: capacity dispatch with expert parallelism"):
        loop.train_and_evaluate(cfg, tmp_path / "groups")
    cfg = lm_config(data_dir, mesh=dict(data=1, expert=8))
    cfg.model.moe.num_experts = 12
    with pytest.raises(ValueError, match=r"num_experts=12 must be divisible by mesh\.expert=8"):
        loop.train_and_evaluate(cfg, tmp_path / "experts")


def test_two_processes_match_one_process(tmp_path, data_dir):
    cfg = lm_config(data_dir, steps=3, mesh=dict(data=2, expert=4))
    loop.train_and_evaluate(cfg, tmp_path / "one")
    config_file = tmp_path / "config.py"
    config_file.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_sharded_training import lm_config

        def get_config():
            return lm_config({data_dir!r}, steps=3, mesh=dict(data=2, expert=4))
    """))
    cmd = [sys.executable, "-m", "moejax.main", f"--config={config_file}", f"--workdir={tmp_path / 'two'}"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"      # as the one-process run above (quick_compiles)
    results = launch.launch(cmd, num_processes=2, devices_per_process=4, env=env, timeout=300)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed:\n{r.stdout[-4000:]}"
    assert "final step 3" in results[0].stdout
    assert_trees_close(final_params(tmp_path / "two"), final_params(tmp_path / "one"), rtol=1e-4, atol=1e-5)
