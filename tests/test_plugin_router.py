"""The plug-in contract, shown end to end: a router kind written in a file of its own outside ``moejax/``
(``tests/plugins/temperature_topk.py``) is selected by name from a config, from a mapping and from the command
line, composes with the library's transforms, and routes exactly as its definition says.

This file is also a config file for ``python -m moejax.main --config=tests/test_plugin_router.py``: its
``get_config`` loads the plug-in the way an experiment directory loads its own mechanisms.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, sweep

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

HERE = pathlib.Path(__file__).resolve().parent
toy = sweep.load_sibling(__file__, "moejax_tests", "plugins/temperature_topk")   # registers 'temperature_topk'


def get_config():
    """The quickstart with its first MoE layer routed by the plug-in (``temperature`` left unwritten)."""
    quickstart = sweep.load_sibling(str(HERE.parent / "configs" / "quickstart.py"), "moejax_configs", "quickstart")
    config = quickstart.get_config()
    config.model.layers[0]["router"] = {"kind": "temperature_topk", "k": 2}
    return config


def layer_config(router: RouterConfig) -> MoEConfig:
    return MoEConfig(num_experts=4, hidden_dim=8, router=router, dispatch=DispatchConfig(mode="dropless", gmm="bulk"))


def test_the_plugin_equals_top_k_with_a_scaled_router_in_values_and_gradients():
    tau = 0.5
    plugin_cfg = MoEConfig.from_dict({"num_experts": 4, "hidden_dim": 8, "dispatch": {"gmm": "bulk"},
                                      "router": {"kind": "temperature_topk", "temperature": tau, "k": 2}})
    assert plugin_cfg == layer_config(RouterConfig(kind="temperature_topk", temperature=tau))
    oracle_cfg = layer_config(RouterConfig(kind="topk", k=2, renormalize=True))
    x = jax.random.normal(jax.random.key(0), (2, 6, 5))
    params = nn.unbox(jax.jit(MoELayer(plugin_cfg).init)(jax.random.key(1), x))["params"]
    scaled = {**params, "router": {"kernel": params["router"]["kernel"] / tau}}

    def loss(cfg, p, xx):
        return jnp.sum(jnp.sin(MoELayer(cfg).apply({"params": p}, xx, deterministic=False).y))

    val, (gp, gx) = jax.jit(jax.value_and_grad(lambda p, xx: loss(plugin_cfg, p, xx), argnums=(0, 1)))(params, x)
    want, (wp, wx) = jax.jit(jax.value_and_grad(lambda p, xx: loss(oracle_cfg, p, xx), argnums=(0, 1)))(scaled, x)
    np.testing.assert_allclose(val, want, rtol=1e-5)
    np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gp["experts"]["w_in"], wp["experts"]["w_in"], rtol=1e-4, atol=1e-6)
    # d/dW of f(W / tau) is f'(W / tau) / tau.
    np.testing.assert_allclose(gp["router"]["kernel"], wp["router"]["kernel"] / tau, rtol=1e-4, atol=1e-6)


def test_the_plugin_validates_its_own_fields_and_takes_the_library_transforms():
    with pytest.raises(ValueError, match=r"^router\.temperature=0: must be a finite number > 0"):
        RouterConfig(kind="temperature_topk", temperature=0)
    with pytest.raises(ValueError, match=r"^router\.score='sigmoid': not a field of router\.kind='temperature_topk'"):
        RouterConfig(kind="temperature_topk", score="sigmoid")
    cfg = RouterConfig(kind="temperature_topk", temperature=2.0, num_groups=2, top_groups=1, selection_bias=True,
                       gumbel_noise=0.5)
    assert [t.name for t in cfg.transforms] == ["gumbel", "selection_bias", "group_limit"]
    x = jax.random.normal(jax.random.key(0), (16, 5))
    layer = MoELayer(layer_config(cfg))
    variables = jax.jit(layer.init)(jax.random.key(1), x)
    out, state = jax.jit(lambda v, xx: layer.apply(v, xx, deterministic=False, mutable=["moe_state"],
                                                   rngs={"jitter": jax.random.key(2)}))(variables, x)
    groups = np.asarray(jax.tree_util.tree_leaves(state)[0])
    assert groups.shape == (4,) and np.abs(groups).sum() > 0                   # the selection bias moved
    np.testing.assert_allclose(out.stats.experts_per_token, 2.0)


def test_selected_from_the_command_line_with_an_unwritten_field(tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "moejax.main", f"--config={HERE / 'test_plugin_router.py'}",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}", "--config.train.steps=4",
         "--config.train.eval_every=4", "--config.train.checkpoint_every=4", "--config.train.log_every=2",
         "--config.train.tensorboard=False", "--config.model.d_model=16", "--config.optimizer.schedule=constant",
         "--config.model.layers[0].router.temperature=0.25",        # not written by get_config
         "--config.model.layers[1].dispatch.gmm=padded"],           # not written by the quickstart
        capture_output=True, text=True, timeout=600, cwd=HERE.parent,
        # a tiny model on one CPU device compiles faster unoptimised (what the module's quick_compiles does in-process)
        env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final step 4" in proc.stdout
    # Not a terminal: the header and one line per log_every steps are printed anyway (no progress bar).
    assert "moejax: parameters" in proc.stdout and "0: E=8 k=2 temperature_topk dropless/bulk" in proc.stdout
    assert "1: E=4 k=1 topk dropless/padded" in proc.stdout
    assert "step 2/4  loss" in proc.stdout and "step 4/4  loss" in proc.stdout and "eval step 4" in proc.stdout
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"temperature_topk"' in saved and '"temperature": 0.25' in saved and '"gmm": "padded"' in saved
