"""Auxiliary losses as plug-ins: each built-in loss's value under uniform routing and at its minimum (as its
docstring states), a loss registered from outside the library (``tests/plugins/overlap_loss.py``) added by the
trainer and logged by name, and older configs' ``train.*_weight`` fields applied to every router."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, sweep
from moejax.models import build_model, model_config, with_router_fields
from moejax.models.config import MLPConfig
from moejax.routing import Routing
from moejax.routing.aux_losses.importance import Importance
from moejax.routing.aux_losses.load_balance import LoadBalance
from moejax.routing.aux_losses.router_entropy import RouterEntropy
from moejax.routing.aux_losses.z_loss import ZLoss
from moejax.routing.loss import LOSSES, loss_inputs
from moejax.training.config import digits_mlp_config, legacy_router_fields, train_settings
from moejax.training.steps import TrainState, make_train_step

overlap = sweep.load_sibling(__file__, "moejax_tests", "plugins/overlap_loss")   # registers loss 'overlap'

E = 4


def _routing(expert_index, probs) -> Routing:
    idx = jnp.asarray(expert_index, jnp.int32)
    probs = jnp.asarray(probs, jnp.float32)
    return Routing(expert_index=idx, weight=jnp.take_along_axis(probs, idx, -1), valid=jnp.ones(idx.shape, bool),
                   probs=probs, num_experts=probs.shape[-1])


def test_each_builtin_loss_at_uniform_routing_and_at_its_minimum():
    # Uniform: every token gives 1/E to every expert, and the T = 8 tokens' choices cover the experts evenly.
    uniform = _routing(np.arange(8)[:, None] % E, np.full((8, E), 1 / E))
    inputs = loss_inputs(uniform, jnp.zeros((8, E)))
    assert float(LoadBalance().value(inputs)) == pytest.approx(1.0)
    assert float(ZLoss().value(inputs)) == pytest.approx(math.log(E) ** 2)
    assert float(Importance().value(inputs)) == pytest.approx(0.0, abs=1e-9)
    assert float(RouterEntropy().value(inputs)) == pytest.approx(math.log(E))
    # Minima: all probability on the expert that gets no copy (load balance 0); logsumexp 0 (z-loss 0); every
    # token certain (entropy 0).
    probs = np.zeros((8, E))
    probs[:, 3] = 1.0
    starved = _routing(np.arange(8)[:, None] % 3, probs)
    logits = jnp.log(jnp.asarray(probs) + 1e-30)
    inputs = loss_inputs(starved, logits - jax.nn.logsumexp(logits, -1, keepdims=True))
    assert float(LoadBalance().value(inputs)) == pytest.approx(0.0, abs=1e-9)
    assert float(ZLoss().value(inputs)) == pytest.approx(0.0, abs=1e-6)
    assert float(RouterEntropy().value(inputs)) == pytest.approx(0.0, abs=1e-6)
    # Importance: every token's whole weight on one expert: CV^2 = E - 1 (its maximum).
    one = loss_inputs(_routing(np.full((8, 1), 3), probs), logits)
    assert float(Importance().value(one)) == pytest.approx(E - 1, rel=1e-5)


def test_a_router_holds_every_registered_loss_and_computes_the_weighted_ones():
    cfg = RouterConfig(k=2, overlap_weight=0.5, z_loss_weight=0.0)
    assert [loss.name for loss in cfg.losses] == [name for name, _ in LOSSES.items()]
    assert [loss.name for loss in cfg.active_losses] == ["load_balance", "overlap"]
    assert cfg.overlap_weight == 0.5 and cfg.to_dict()["overlap_weight"] == 0.5
    with pytest.raises(ValueError, match=r"^router\.overlap_weight=-1: must be a finite number >= 0"):
        RouterConfig(overlap_weight=-1)
    layer = MoEConfig(num_experts=E, hidden_dim=8, router=cfg, dispatch=DispatchConfig(mode="dropless", gmm="bulk"))
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    variables = meta.unbox(MoELayer(layer).init(jax.random.key(1), x))
    out = MoELayer(layer).apply(variables, x)
    assert sorted(out.stats.losses) == ["load_balance", "overlap"]
    logits = out.logits.reshape(-1, E)
    probs = jax.nn.softmax(logits, -1)
    unit = probs / jnp.linalg.norm(probs, axis=0, keepdims=True)
    gram = unit.T @ unit
    want = 0.5 * (gram.sum() - jnp.trace(gram)) / (E * (E - 1))
    np.testing.assert_allclose(out.stats.losses["overlap"], want, rtol=1e-5)      # weighted by the plug-in


def test_the_trainer_adds_every_loss_and_logs_each_by_name():
    def model_with(**weights):
        spec = MoEConfig(num_experts=E, hidden_dim=8, dispatch=DispatchConfig(mode="dropless", gmm="bulk"),
                         router=RouterConfig(k=2, **weights))
        return build_model(MLPConfig(num_classes=3, d_model=8, layers=(spec, spec)))

    x = jax.random.normal(jax.random.key(3), (16, 5))
    batch = {"inputs": x, "labels": jax.random.randint(jax.random.key(4), (16,), 0, 3)}
    plain = model_with(load_balance_weight=0.0, z_loss_weight=0.0)
    variables = dict(meta.unbox(jax.jit(plain.init)(jax.random.key(1), x)))
    params = variables.pop("params")
    tx = optax.sgd(0.1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), moe_state=variables,
                       rng=jax.random.key_data(jax.random.key(7)))
    _, m0 = jax.jit(make_train_step(plain, tx, "classification"))(state, batch)
    _, m1 = jax.jit(make_train_step(model_with(overlap_weight=0.3), tx, "classification"))(state, batch)
    assert not any(k.startswith("loss/") for k in m0)
    assert {"loss/load_balance", "loss/z_loss", "loss/overlap"} <= set(m1)
    added = sum(float(m1[k]) for k in m1 if k.startswith("loss/"))
    np.testing.assert_allclose(float(m1["loss"]) - float(m0["loss"]), added, rtol=1e-5)


def test_older_configs_loss_weights_in_train_apply_to_every_router():
    config = digits_mlp_config([{"num_experts": E, "hidden_dim": 8}, 16, {"num_experts": 2, "hidden_dim": 8}])
    assert legacy_router_fields(train_settings(config)) == {}
    config.train.load_balance_weight = 0.0
    config.train.importance_weight = 0.2
    fields = legacy_router_fields(train_settings(config))
    assert fields == {"load_balance_weight": 0.0, "importance_weight": 0.2}
    cfg = with_router_fields(model_config(config.model, num_classes=10), fields)
    routers = [spec.router for spec in cfg.layers if isinstance(spec, MoEConfig)]
    assert len(routers) == 2 and all(r.load_balance_weight == 0.0 and r.importance_weight == 0.2
                                     and r.z_loss_weight == 0.001 for r in routers)
    config.train.z_loss_weight = -1.0
    with pytest.raises(ValueError, match=r"^train\.z_loss_weight=-1\.0: must be a finite number >= 0"):
        train_settings(config)
