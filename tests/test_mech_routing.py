"""Balanced assignment (Sinkhorn, BASE, capacity-bounded OT), the attention router and DynaMoE (threshold
routing and layer-wise schedules): hand-checked cases, invariants and oracle agreement in training mode.
Oracle agreement in evaluation mode (``balance_in_eval``) across all dispatchers is in tests/test_layer.py
(ROUTERS); the example configs in configs/mechanisms/ are trained in tests/test_mechanism_configs.py."""
import dataclasses
import math

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, reference
from moejax.models.config import MLPConfig
from moejax.routing import (SCHEDULES, Router, attention_router_logits, balanced_assignment, base_routing,
                            capped_transport_plan, expert_slots, layer_budget, schedule_weights,
                            scheduled_moe_layers, sinkhorn_plan, sinkhorn_routing, sparse_ot_routing,
                            threshold_routing, top_k_routing)

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised


# ------------------------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_hand_computed_two_by_two():
    # exp(logits) = [[4, 1], [2, 1]]: both tokens prefer expert 0. A 2x2 plan with unit rows and columns is
    # [[a, 1-a], [1-a, a]], and Sinkhorn keeps the cross ratio: a^2 / (1-a)^2 = (4 * 1) / (1 * 2) = 2.
    logits = jnp.log(jnp.array([[4.0, 1.0], [2.0, 1.0]]))
    a = math.sqrt(2) / (1 + math.sqrt(2))
    np.testing.assert_allclose(jax.jit(sinkhorn_plan, static_argnums=1)(logits, 50), [[a, 1 - a], [1 - a, a]],
                               rtol=1e-5)
    r = jax.jit(sinkhorn_routing, static_argnums=1, static_argnames="iterations")(logits, 1, iterations=50)
    np.testing.assert_array_equal(r.expert_index, [[0], [1]])                # top-1 would give [[0], [0]]
    np.testing.assert_allclose(r.weight, [[0.8], [1 / 3]], rtol=1e-6)          # softmax probs of the choice
    np.testing.assert_array_equal(top_k_routing(logits, 1).expert_index, [[0], [0]])


def test_sinkhorn_plan_rows_exact_columns_near_uniform_and_load_balanced():
    t, e = 64, 8
    logits = 2.0 * jax.random.normal(jax.random.key(0), (t, e)) + jnp.linspace(0, 3, e)   # skewed to the last
    plan = np.asarray(jax.jit(sinkhorn_plan, static_argnums=1)(logits, 100))
    np.testing.assert_allclose(plan.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(plan.sum(0), t / e, rtol=1e-3)
    route = jax.jit(sinkhorn_routing, static_argnums=1, static_argnames="iterations")
    balanced = np.asarray(route(logits, 1, iterations=100).expert_load)
    greedy = np.asarray(top_k_routing(logits, 1).expert_load)
    assert balanced.max() < greedy.max() and balanced.max() <= 2.0 / e


# ---------------------------------------------------------------------------------------------- BASE


def optimal_total(scores: np.ndarray) -> float:
    slots = np.asarray(expert_slots(*scores.shape))
    cols = np.repeat(np.arange(scores.shape[1]), slots)
    rows, picked = linear_sum_assignment(-scores[:, cols])
    return float(scores[rows, cols[picked]].sum())


@pytest.mark.parametrize("t,e,seed", [(24, 4, 0), (22, 4, 1), (16, 8, 2), (30, 5, 3), (7, 7, 4)])
def test_balanced_assignment_is_optimal_and_exactly_balanced(t, e, seed):
    scores = np.random.RandomState(seed).randint(0, 10, (t, e)).astype(np.float32)   # integers: exact optimum
    a = np.asarray(jax.jit(balanced_assignment)(jnp.asarray(scores)))
    np.testing.assert_array_equal(np.bincount(a, minlength=e), expert_slots(t, e))
    assert scores[np.arange(t), a].sum() == optimal_total(scores)


def test_balanced_assignment_real_scores_within_the_documented_bound():
    scores = np.asarray(jax.random.normal(jax.random.key(5), (48, 6)))
    a = np.asarray(jax.jit(balanced_assignment)(jnp.asarray(scores)))
    np.testing.assert_array_equal(np.bincount(a, minlength=6), 8)
    span = scores.max() - scores.min()
    assert scores[np.arange(48), a].sum() >= optimal_total(scores) - 1e-3 * span - 1e-4


def test_base_routing_hand_computed():
    # Each expert takes 2 of 4 tokens. Token 3 prefers expert 1; of tokens 0-2 (all prefer expert 0) the
    # one that loses least by moving is token 2 (margin 1): assignment [0, 0, 1, 1], total 3 + 2 + 0 + 0.5.
    logits = jnp.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.5]])
    r = jax.jit(base_routing, static_argnames="score")(logits, score="sigmoid")
    np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(r.weight[:, 0], jax.nn.sigmoid(jnp.array([3.0, 2.0, 0.0, 0.5])), rtol=1e-6)
    np.testing.assert_allclose(r.expert_load, [0.5, 0.5])


# ---------------------------------------------------------------------------------- capacity-bounded OT


def test_capped_plan_rows_exact_and_columns_within_the_bound():
    logits = 3.0 * jax.random.normal(jax.random.key(1), (40, 4)) + jnp.array([2.0, 0, 0, 0])
    plan = np.asarray(jax.jit(capped_transport_plan, static_argnums=(1, 2))(logits, 12.0, 200))
    np.testing.assert_allclose(plan.sum(1), 1.0, rtol=1e-5)
    assert plan.sum(0).max() <= 12.0 * (1 + 1e-3)
    assert plan.sum(0)[0] > 11.9                                               # the popular expert is full


def test_sparse_ot_hand_computed():
    # Three tokens prefer expert 0, which takes at most C = 2: at a low temperature the plan moves the token
    # with the smallest margin (token 2) to expert 1; capacity dispatch of plain top-1 would drop it instead.
    logits = jnp.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    route = jax.jit(sparse_ot_routing, static_argnums=(1, 2), static_argnames=("iterations", "temperature"))
    r = route(logits, 1, 2, iterations=200, temperature=0.05)
    np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 1])
    assert bool(r.valid.all())
    np.testing.assert_allclose(r.weight[:, 0], jax.nn.softmax(logits)[jnp.arange(3), jnp.array([0, 0, 1])], rtol=1e-6)


@pytest.mark.parametrize("k,capacity", [(1, 8), (2, 12), (2, 6)])
def test_sparse_ot_never_exceeds_capacity_or_k(k, capacity):
    t, e = 48, 8
    logits = 2.0 * jax.random.normal(jax.random.key(2), (t, e)) + jnp.linspace(0, 2, e)
    r = jax.jit(sparse_ot_routing, static_argnums=(1, 2))(logits, k, capacity)
    idx, valid = np.asarray(r.expert_index), np.asarray(r.valid)
    counts = np.bincount(idx[valid], minlength=e)
    assert counts.max() <= capacity
    assert all(len(set(row)) == k for row in idx)                             # distinct experts per token
    # The plan spreads the load: far fewer copies are cut than plain top-k would lose to the same capacity.
    greedy = np.bincount(np.asarray(top_k_routing(logits, k).expert_index).reshape(-1), minlength=e)
    assert (~valid).sum() < np.maximum(greedy - capacity, 0).sum()


# ------------------------------------------------------------------------------------- router integration


def router_apply(cfg: RouterConfig, x, deterministic, capacity=None, e=4):
    router = Router(e, cfg)
    variables = {"params": {"kernel": jax.random.normal(jax.random.key(3), (x.shape[1], e))}}
    apply = jax.jit(lambda v, xx: router.apply(v, xx, capacity=capacity, deterministic=deterministic,
                                               return_logits=True))
    return apply(variables, x)


@pytest.mark.parametrize("kind,k", [("sinkhorn", 2), ("base", 1), ("sparse_ot", 2)])
def test_balanced_kinds_are_greedy_in_eval_unless_balance_in_eval(kind, k):
    x = jax.random.normal(jax.random.key(4), (16, 5))
    cfg = RouterConfig(kind=kind, k=k)
    train, logits = router_apply(cfg, x, deterministic=False, capacity=8)
    evals, _ = router_apply(cfg, x, deterministic=True, capacity=8)
    both, _ = router_apply(dataclasses.replace(cfg, balance_in_eval=True), x, deterministic=True, capacity=8)
    greedy = top_k_routing(logits, k)
    np.testing.assert_array_equal(evals.expert_index, greedy.expert_index)
    np.testing.assert_array_equal(both.expert_index, train.expert_index)
    assert not np.array_equal(train.expert_index, greedy.expert_index)     # the plan changed something


# ---------------------------------------------------------------------------------------- attention router


def test_attention_logits_hand_computed():
    # D = 1, x = 1: q = [1, 2], k = [0, ln 3], v = [4, 8]. Row 0: softmax([0, ln 3]) = [1/4, 3/4] -> 7;
    # row 1: softmax([0, 2 ln 3]) = [1/10, 9/10] -> 7.6.
    x = jnp.ones((1, 1))
    out = attention_router_logits(x, jnp.array([[1.0, 2.0]]), jnp.array([[0.0, math.log(3.0)]]),
                                  jnp.array([[4.0, 8.0]]))
    np.testing.assert_allclose(out, [[7.0, 7.6]], rtol=1e-6)


def test_attention_router_parameters_and_composition_with_top_k():
    cfg = MoEConfig(num_experts=4, hidden_dim=3, router=RouterConfig(k=2, scorer="attention"))
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    variables = jax.eval_shape(MoELayer(cfg).init, jax.random.key(1), x)
    router = variables["params"]["router"]
    assert set(router) == {"kernel", "key_kernel", "value_kernel"}
    for p in router.values():
        assert p.value.shape == (6, 4) and p.names == ("embed", "expert")
    frozen = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, frozen=True))
    state = jax.eval_shape(MoELayer(frozen).init, jax.random.key(1), x)
    assert "router" not in state["params"] and set(state["moe_state"]["router"]) == set(router)


# ------------------------------------------------------------------------------------- threshold (DynaMoE)


@pytest.mark.parametrize("tau,max_k,used", [(0.2, 4, 2), (0.6, 4, 1), (0.1, 4, 3), (0.1, 2, 2), (0.04, 4, 4)])
def test_threshold_hand_computed(tau, max_k, used):
    r = threshold_routing(jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]])), tau, max_k)
    np.testing.assert_array_equal(r.expert_index, [[1, 3, 0, 2][:max_k]])
    np.testing.assert_array_equal(r.valid[0], [True] * used + [False] * (max_k - used))
    np.testing.assert_allclose(r.weight[0], np.array([0.5, 0.3, 0.15, 0.05][:max_k]) * (np.arange(max_k) < used),
                               rtol=1e-6)


def test_threshold_percentile_mode_is_dynamic_and_bounded():
    logits = 2.0 * jax.random.normal(jax.random.key(6), (128, 8))
    q = 80.0
    r = threshold_routing(logits, q, 8, mode="percentile")
    probs = np.asarray(jax.nn.softmax(logits, -1))
    tau = np.percentile(probs, q)
    w = np.take_along_axis(probs, np.asarray(r.expert_index), -1)
    want = (w >= tau) | (np.arange(8) == 0)
    np.testing.assert_array_equal(r.valid, want)
    n = want.sum(-1)
    assert n.min() >= 1 and len(set(n.tolist())) > 2
    capped = threshold_routing(logits, q, 2, mode="percentile")
    assert int(np.asarray(capped.valid).sum(-1).max()) == 2


# ------------------------------------------------------------------------ oracle agreement in training


MECHANISMS = {
    "sinkhorn": RouterConfig(kind="sinkhorn", k=2, balance_iterations=10),
    "base": RouterConfig(kind="base", k=1, score="sigmoid"),
    "sparse_ot": RouterConfig(kind="sparse_ot", k=2, renormalize=True),
    "attention": RouterConfig(k=2, scorer="attention"),
    "threshold": RouterConfig(kind="threshold", k=3, threshold=0.15),
}


# One dispatch mode each (capacity where a mechanism interacts with drops); every dispatcher is covered in
# evaluation mode by tests/test_layer.py ROUTERS.
@pytest.mark.parametrize("name,mode", [("sinkhorn", "dropless"), ("base", "capacity"), ("sparse_ot", "capacity"),
                                       ("attention", "dropless"), ("threshold", "capacity")])
def test_training_mode_matches_reference(name, mode):
    e, d = 4, 5
    cfg = MoEConfig(num_experts=e, hidden_dim=3, router=MECHANISMS[name],
                    dispatch=DispatchConfig(mode=mode, capacity_factor=1.0, gmm="blocked", gmm_tile=4))
    x = jax.random.normal(jax.random.key(0), (2, 8, d))
    params = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))["params"]
    params["router"] = {n: jax.random.normal(jax.random.key(i + 2), (d, e)) for i, n in enumerate(params["router"])}
    cot = jax.random.normal(jax.random.key(9), x.shape)
    cap = cfg.capacity(16, True)

    def layer(p, xx):
        return jnp.sum(MoELayer(cfg).apply({"params": p}, xx, deterministic=False).y * cot)

    def oracle(p, xx):
        tokens = xx.reshape(-1, d)
        routing = Router(e, cfg.router).apply({"params": p["router"]}, tokens, capacity=cap, deterministic=False)
        y = reference.moe(tokens, routing, p["experts"], kind="mlp", activation="gelu",
                          capacity=cap if mode == "capacity" else None)
        return jnp.sum(y.reshape(xx.shape) * cot)

    (v, g), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x) for f in (layer, oracle))
    np.testing.assert_allclose(v, v_ref, rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(g[0]["router"]["kernel"]).max()) > 0


# ------------------------------------------------------------------------------------ layer schedules


@given(schedule=st.sampled_from(SCHEDULES), num_layers=st.integers(1, 12), extra=st.integers(0, 60))
def test_schedule_budget_exact_and_shape_respected(schedule, num_layers, extra):
    total = num_layers + extra
    counts = layer_budget(schedule, total, num_layers)
    assert sum(counts) == total and min(counts) >= 1 and len(counts) == num_layers
    w = schedule_weights(schedule, num_layers)
    for i in range(num_layers):
        for j in range(num_layers):
            if w[i] > w[j]:
                assert counts[i] >= counts[j]          # more weight never gets fewer experts
            if w[i] == w[j]:
                assert abs(counts[i] - counts[j]) <= 1


@pytest.mark.parametrize("schedule,want", [
    ("uniform", [4, 4, 4, 4, 4]), ("descending", [6, 5, 4, 3, 2]), ("ascending", [2, 3, 4, 5, 6]),
    ("pyramid", [3, 4, 6, 4, 3]), ("hourglass", [5, 4, 2, 4, 5]), ("wave", [5, 3, 5, 3, 4])])
def test_schedule_hand_computed(schedule, want):
    # 20 experts over 5 layers: 1 each, then 15 shared by weight; e.g. descending weights 5..1 (sum 15) add
    # 5, 4, 3, 2, 1; wave weights 2,1,2,1,2 (sum 8) add 3.75, 1.875, ...: floors 3,1,3,1,3 and the two
    # leftover units go to the largest remainders (the odd layers' 7/8 ... see layer_budget).
    assert layer_budget(schedule, 20, 5) == want


def test_schedule_monotone_and_errors_name_the_field():
    d = layer_budget("descending", 37, 6)
    assert all(a >= b for a, b in zip(d, d[1:])) and sum(d) == 37
    a = layer_budget("ascending", 37, 6)
    assert all(x <= y for x, y in zip(a, a[1:]))
    with pytest.raises(ValueError, match=r"^total_experts=3: must be an integer >= num_layers=4"):
        scheduled_moe_layers(MoEConfig(), "uniform", 3, 4)
    with pytest.raises(ValueError, match=r"^schedule='zigzag'"):
        layer_budget("zigzag", 8, 2)
    with pytest.raises(ValueError, match=r"^num_layers=0"):
        layer_budget("uniform", 8, 0)
    with pytest.raises(ValueError, match=r"^total_k=12: gives layer 1 k=4 > its num_experts=3"):
        scheduled_moe_layers(MoEConfig(), "ascending", 8, 3, total_k=12)


def test_scheduled_layers_build_an_mlp_config():
    base = MoEConfig(num_experts=1, hidden_dim=8, router=RouterConfig(kind="threshold", k=1, threshold=0.3))
    layers = scheduled_moe_layers(base, "descending", 24, 3, total_k=6)
    assert [c.num_experts for c in layers] == [12, 8, 4] and [c.router.k for c in layers] == [3, 2, 1]
    assert all(c.router.kind == "threshold" and c.hidden_dim == 8 for c in layers)
    model = MLPConfig.from_dict({"num_classes": 10, "layers": [dataclasses.asdict(c) for c in layers]})
    assert model.layers == layers
    plain = scheduled_moe_layers(MoEConfig(router=RouterConfig(k=2)), "ascending", 6, 3)
    assert [c.num_experts for c in plain] == [1, 2, 3] and [c.router.k for c in plain] == [1, 2, 2]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "base", "k": 2}, r"^router\.k=2: kind='base'"),
    ({"kind": "threshold"}, r"^router\.threshold=None: required"),
    ({"kind": "threshold", "threshold": 1.5}, r"^router\.threshold=1\.5: must be in \(0, 1\]"),
    ({"kind": "threshold", "threshold": 100, "threshold_mode": "percentile"}, r"^router\.threshold=100"),
    ({"threshold": 0.2}, r"^router\.threshold=0\.2: not a field of router.kind='topk'"),
    ({"threshold_mode": "median"}, r"^router\.threshold_mode='median'"),
    ({"logits": "mlp"}, r"^router\.logits='mlp'"),
    ({"kind": "hash", "logits": "attention"}, r"^router\.logits='attention': kind='hash'"),
    ({"kind": "sinkhorn", "balance_iterations": 0}, r"^router\.balance_iterations=0"),
    ({"kind": "sinkhorn", "balance_temperature": 0.0}, r"^router\.balance_temperature=0\.0"),
    ({"kind": "sinkhorn", "balance_in_eval": 1}, r"^router\.balance_in_eval=1"),
    ({"kind": "sinkhorn", "num_groups": 2}, r"^router\.num_groups=2"),
])
def test_router_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_sparse_ot_needs_a_capacity_factor_of_at_least_one():
    with pytest.raises(ValueError, match=r"^dispatch\.capacity_factor=0\.5: router\.kind='sparse_ot'"):
        MoEConfig(router=RouterConfig(kind="sparse_ot"), dispatch=DispatchConfig(mode="capacity", capacity_factor=0.5))
    MoEConfig(router=RouterConfig(kind="sparse_ot"), dispatch=DispatchConfig(capacity_factor=None))
