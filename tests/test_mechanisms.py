"""Routing mechanisms from the MoE literature (docs/routing_mechanisms.md): hand-checked cases and invariants.

Agreement with the oracle through the MoE layer is in tests/test_layer.py (ROUTERS, NOISY_ROUTERS, STOCHASTIC).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.context import LayerContext
from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig
from moejax.routing.aux_losses.z_loss import ZLoss
from moejax.routing.loss import loss_inputs
from moejax.routing import (Router, active_experts_histogram, consistency_loss, drop_gates, hash_routing,
                            random_routing, smoe_dropout_k, top_k_routing, top_p_routing)

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

D = 6


def probs_to_logits(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


# ----------------------------------------------------------------------------------------------- top-p


@pytest.mark.parametrize("p,max_k,used", [(0.45, 4, 1), (0.7, 4, 2), (0.9, 4, 3), (1.0, 4, 4), (0.9, 2, 2)])
def test_top_p_hand_computed(p, max_k, used):
    # Sorted probabilities 0.5, 0.3, 0.15, 0.05: mass before each slot 0, 0.5, 0.8, 0.95.
    r = top_p_routing(probs_to_logits([[0.15, 0.5, 0.05, 0.3]]), p, max_k)
    np.testing.assert_array_equal(r.expert_index, [[1, 3, 0, 2][:max_k]])
    np.testing.assert_array_equal(r.valid[0], [True] * used + [False] * (max_k - used))
    want = np.array([0.5, 0.3, 0.15, 0.05][:max_k]) * (np.arange(max_k) < used)
    np.testing.assert_allclose(r.weight[0], want, rtol=1e-6)
    np.testing.assert_allclose(r.experts_per_token, used)


def test_top_p_renormalised_weights_sum_to_one():
    r = top_p_routing(probs_to_logits([[0.15, 0.5, 0.05, 0.3]]), 0.7, 4, renormalize=True)
    np.testing.assert_allclose(r.weight[0], [0.625, 0.375, 0, 0], rtol=1e-6)


def test_top_p_is_the_smallest_prefix_reaching_p():
    logits = 2.0 * jax.random.normal(jax.random.key(0), (256, 8))
    p, max_k = 0.6, 5
    r = top_p_routing(logits, p, max_k)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    w = np.take_along_axis(probs, np.asarray(r.expert_index), -1)
    valid = np.asarray(r.valid)
    n = valid.sum(-1)
    assert (np.diff(-w, axis=-1) >= 0).all()                               # descending probability
    assert (valid[:, 0]).all() and (valid == (np.arange(max_k) < n[:, None])).all()   # a prefix, never empty
    mass = (w * valid).sum(-1)
    assert ((mass >= p - 1e-6) | (n == max_k)).all()                         # reaches p, or hit the maximum
    mass_without_last = mass - w[np.arange(256), n - 1]
    assert (mass_without_last < p).all()                                     # and is the smallest such set
    assert len(set(n.tolist())) > 1                                          # genuinely dynamic
    np.testing.assert_allclose(active_experts_histogram(r.valid), np.bincount(n, minlength=max_k + 1) / 256,
                               rtol=1e-6)


def test_top_p_one_with_all_experts_is_top_e():
    logits = jax.random.normal(jax.random.key(1), (16, 4))
    a, b = top_p_routing(logits, 1.0, 4), top_k_routing(logits, 4)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6)


def test_top_p_gradient_flows_to_kept_logits_only():
    logits = probs_to_logits([[0.15, 0.5, 0.05, 0.3]])
    g = jax.grad(lambda l: top_p_routing(l, 0.7, 4).weight.sum())(logits)
    # d(p1 + p3)/d logits = p_i * (1[i kept] - 0.8): positive on the kept experts, negative elsewhere.
    np.testing.assert_allclose(g[0], np.array([0.15, 0.5, 0.05, 0.3]) * (np.array([0, 1, 0, 1]) - 0.8), atol=1e-6)


# ------------------------------------------------------------------------------------------ hash, random


def test_hash_routing_is_a_fixed_function_of_the_id():
    ids = jnp.array([3, 7, 3, 11, 7, 3])
    r = hash_routing(ids, 8, 2)
    idx = np.asarray(r.expert_index)
    np.testing.assert_array_equal(idx[0], idx[2])
    np.testing.assert_array_equal(idx[0], idx[5])
    np.testing.assert_array_equal(idx[1], idx[4])
    assert (idx[:, 0] != idx[:, 1]).all()                                    # distinct experts
    np.testing.assert_allclose(r.weight, 0.5)
    np.testing.assert_array_equal(hash_routing(ids, 8, 2).expert_index, idx)  # deterministic
    assert not np.array_equal(hash_routing(jnp.arange(64), 8, 1, seed=1).expert_index,
                              hash_routing(jnp.arange(64), 8, 1, seed=0).expert_index)
    np.testing.assert_allclose(r.probs.sum(-1), 1.0)
    assert float(ZLoss().value(loss_inputs(r, None))) == 0.0             # no learned logits: no z-loss


def test_hash_and_random_routing_are_roughly_uniform():
    for r in (hash_routing(jnp.arange(8000), 8, 1), random_routing(jax.random.key(0), 8000, 8, 1)):
        load = np.asarray(r.expert_load)
        np.testing.assert_allclose(load, 1 / 8, atol=0.015)


def test_random_routing_distinct_experts_and_key_dependence():
    a = random_routing(jax.random.key(0), 64, 8, 3)
    b = random_routing(jax.random.key(1), 64, 8, 3)
    idx = np.sort(np.asarray(a.expert_index), -1)
    assert (np.diff(idx, axis=-1) > 0).all()
    assert not np.array_equal(a.expert_index, b.expert_index)
    np.testing.assert_allclose(a.weight, 1 / 3, rtol=1e-6)


def test_hash_layer_uses_token_ids_and_defaults_to_the_token_index():
    cfg = MoEConfig(num_experts=8, hidden_dim=5, router=RouterConfig(kind="hash", k=1),
                    dispatch=DispatchConfig(gmm="blocked", gmm_tile=8))
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 1, D)), (2, 4, D))   # 8 equal tokens
    v = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))
    assert "router" not in v["params"]
    same_id = MoELayer(cfg).apply(v, x, LayerContext(token_ids=jnp.full((2, 4), 5))).y
    np.testing.assert_allclose(same_id, jnp.broadcast_to(same_id[:1, :1], same_id.shape), rtol=1e-6)
    by_index = MoELayer(cfg).apply(v, x).y
    explicit = MoELayer(cfg).apply(v, x, LayerContext(token_ids=jnp.arange(8).reshape(2, 4))).y
    np.testing.assert_array_equal(by_index, explicit)
    assert len({tuple(np.round(row, 5)) for row in np.asarray(by_index).reshape(8, D)}) > 1


def test_random_router_is_random_in_eval_too_and_seeded_without_rng():
    cfg = RouterConfig(kind="random", k=1, seed=4)
    x = jnp.ones((32, D))
    router = Router(8, cfg)
    a = router.apply({}, x)                                          # no RNG: a fixed draw from the seed
    np.testing.assert_array_equal(a.expert_index, router.apply({}, x).expert_index)
    b = router.apply({}, x, rngs={"jitter": jax.random.key(0)})
    c = router.apply({}, x, rngs={"jitter": jax.random.key(1)})
    assert not np.array_equal(b.expert_index, c.expert_index)
    assert len(set(np.asarray(a.expert_index).ravel().tolist())) > 1      # equal tokens, different experts


def test_consistency_loss_hand_computed_and_symmetric():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    kl_pq, kl_qp = np.sum(p * np.log(p / q)), np.sum(q * np.log(q / p))
    la, lb = jnp.log(jnp.array([p])), jnp.log(jnp.array([q]))
    np.testing.assert_allclose(consistency_loss(la, lb), 0.5 * (kl_pq + kl_qp), rtol=1e-5)
    np.testing.assert_allclose(consistency_loss(lb, la), consistency_loss(la, lb), rtol=1e-6)
    np.testing.assert_allclose(consistency_loss(la + 3.0, la), 0.0, atol=1e-7)   # shift-invariant logits
    g = jax.grad(consistency_loss)(la, lb)
    assert float(jnp.abs(g).max()) > 0


# ------------------------------------------------------------------------------------------------ noise


def test_gumbel_top1_samples_from_the_router_distribution():
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    logits = jnp.broadcast_to(probs_to_logits(probs), (20000, 4))
    cfg = RouterConfig(k=1, gumbel_noise=1.0)
    r = Router(4, cfg, kernel_init=lambda *a: jnp.eye(4)).apply(
        {"params": {"kernel": jnp.eye(4)}}, logits, deterministic=False, rngs={"jitter": jax.random.key(0)})
    freq = np.bincount(np.asarray(r.expert_index[:, 0]), minlength=4) / 20000
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # The weights are the noise-free probabilities of the sampled experts.
    np.testing.assert_allclose(r.weight[:, 0], probs[np.asarray(r.expert_index[:, 0])], rtol=1e-5)


def test_gate_dropout_drops_at_the_rate_and_rescales():
    logits = jax.random.normal(jax.random.key(0), (4000, 8))
    base = top_k_routing(logits, 2)
    assert drop_gates(base, jax.random.key(1), 0.0).valid.all()
    r = drop_gates(base, jax.random.key(1), 0.25)
    valid = np.asarray(r.valid)
    assert abs(1 - valid.mean() - 0.25) < 0.02
    np.testing.assert_allclose(np.asarray(r.weight)[valid], np.asarray(base.weight)[valid] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.weight)[~valid], 0.0)
    np.testing.assert_allclose(r.expert_load.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(r.experts_per_token, valid.sum(-1).mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------- SMoE-Dropout, residual


def test_frozen_router_lives_outside_params_and_gets_no_gradient():
    cfg = MoEConfig(num_experts=8, hidden_dim=5, router=RouterConfig(k=2, frozen=True),
                    dispatch=DispatchConfig(gmm="blocked", gmm_tile=8))
    x = jax.random.normal(jax.random.key(0), (2, 12, D))
    v = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))
    assert "router" not in v["params"] and v["moe_state"]["router"]["kernel"].shape == (D, E := 8)
    assert float(jnp.abs(v["moe_state"]["router"]["kernel"]).max()) > 0          # randomly initialised

    def loss(state):
        return MoELayer(cfg).apply({"params": v["params"], "moe_state": state}, x).y.sum()

    g = jax.grad(loss)(v["moe_state"])
    np.testing.assert_array_equal(g["router"]["kernel"], 0.0)
    # k is free at inference: more experts per token with the same (frozen) router.
    for k in (1, 4, E):
        stats = MoELayer(cfg).apply(v, x, LayerContext(k=k)).stats
        np.testing.assert_allclose(stats.experts_per_token, k)
    # A k above the layer's experts gives it all of them (a model-level k serves layers of every size) ...
    np.testing.assert_allclose(MoELayer(cfg).apply(v, x, LayerContext(k=9)).stats.experts_per_token, E)
    with pytest.raises(ValueError, match="moe_k=0"):     # ... but it must be a positive int
        LayerContext(k=0)


def test_smoe_dropout_schedule():
    ks = [smoe_dropout_k(s, 100, 1, 4) for s in range(101)]
    assert ks[0] == 1 and ks[-1] == 4 and ks == sorted(ks)
    assert [ks.count(k) for k in (1, 2, 3, 4)] == [25, 25, 25, 26]
    assert smoe_dropout_k(-5, 100, 2, 2) == 2 and smoe_dropout_k(500, 100, 1, 8) == 8
    with pytest.raises(ValueError, match="k_start"):
        smoe_dropout_k(0, 10, 3, 2)


def test_gating_residual_threads_logits_between_layers():
    cfg = MoEConfig(num_experts=8, hidden_dim=5, router=RouterConfig(k=2, gating_residual=True),
                    dispatch=DispatchConfig(gmm="blocked", gmm_tile=8))
    x = jax.random.normal(jax.random.key(0), (2, 12, D))
    layer = MoELayer(cfg)
    v1 = nn.unbox(layer.init(jax.random.key(1), x))
    v2 = nn.unbox(layer.init(jax.random.key(2), x))
    out1 = layer.apply(v1, x)
    y1, logits1 = out1.y, out1.logits
    assert logits1.shape == (2, 12, 8)
    np.testing.assert_allclose(logits1, x @ v1["params"]["router"]["kernel"], rtol=1e-5, atol=1e-6)
    logits2 = layer.apply(v2, y1, LayerContext(router_logits=logits1)).logits
    np.testing.assert_allclose(logits2, y1 @ v2["params"]["router"]["kernel"] + logits1, rtol=1e-5, atol=1e-6)
    # Without incoming logits the residual adds nothing; with them, it changes the routing.
    y_plain = layer.apply(v2, y1).y
    assert not np.allclose(y_plain, layer.apply(v2, y1, LayerContext(router_logits=10 * logits1)).y)
    # The gradient reaches the previous layer's router through the residual.
    g = jax.grad(lambda p: layer.apply(v2, y1, LayerContext(router_logits=y1 @ p)).y.sum())(
        v1["params"]["router"]["kernel"])
    assert float(jnp.abs(g).max()) > 0
