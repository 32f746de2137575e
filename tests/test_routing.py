"""Routing functions on small hand-computed cases, plus the aux losses and the learned router."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import RouterConfig
from moejax.routing import (Router, aux_free_bias_update, expert_choice_routing, importance_loss, load_balance_loss,
                            router_z_loss, top_k_routing)

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised


def probs_to_logits(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


def test_softmax_top2_without_renormalisation_keeps_probabilities():
    r = top_k_routing(probs_to_logits([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]), 2)
    np.testing.assert_array_equal(r.expert_index, [[0, 1], [2, 1]])
    np.testing.assert_allclose(r.weight, [[0.5, 0.3], [0.7, 0.2]], rtol=1e-6)
    assert r.valid.all()


def test_renormalisation_makes_selected_weights_sum_to_one():
    r = top_k_routing(probs_to_logits([[0.5, 0.3, 0.2]]), 2, renormalize=True)
    np.testing.assert_allclose(r.weight, [[0.625, 0.375]], rtol=1e-6)


def test_sigmoid_scores_with_routed_scaling():
    logits = jnp.array([[0.0, 2.0, -1.0, 1.0]])
    r = top_k_routing(logits, 2, score="sigmoid", renormalize=True, routed_scaling=2.5)
    s = jax.nn.sigmoid(logits[0])
    np.testing.assert_array_equal(r.expert_index, [[1, 3]])
    np.testing.assert_allclose(r.weight[0], 2.5 * s[jnp.array([1, 3])] / (s[1] + s[3]), rtol=1e-6)
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-6)


def test_selection_bias_changes_choice_but_not_weights():
    logits = probs_to_logits([[0.6, 0.3, 0.1]])
    bias = jnp.array([0.0, 0.0, 1.0])
    r = top_k_routing(logits, 1, selection_bias=bias)
    np.testing.assert_array_equal(r.expert_index, [[2]])
    np.testing.assert_allclose(r.weight, [[0.1]], rtol=1e-6)
    g = jax.grad(lambda b: top_k_routing(logits, 1, selection_bias=b).weight.sum())(bias)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("group_score,expected", [("max", [[3, 2]]), ("top2_sum", [[0, 1]])])
def test_group_limited_selection(group_score, expected):
    # Two groups {0,1} and {2,3}. Group max: group 1 (0.40) wins; top-2 sums: group 0 (0.53 vs 0.47) wins.
    p = [[0.27, 0.26, 0.07, 0.40]]
    r = top_k_routing(probs_to_logits(p), 2, num_groups=2, top_groups=1, group_score=group_score)
    np.testing.assert_array_equal(r.expert_index, expected)
    np.testing.assert_allclose(r.weight, np.take_along_axis(np.array(p), np.array(expected), -1), rtol=1e-6)


def test_group_limited_with_all_groups_is_plain_top_k():
    logits = jax.random.normal(jax.random.key(0), (16, 8))
    a = top_k_routing(logits, 3, num_groups=4, top_groups=4)
    b = top_k_routing(logits, 3)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="router.k=4"):
        top_k_routing(jnp.zeros((2, 3)), 4)


def test_expert_choice_each_expert_takes_its_top_tokens():
    p = jnp.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    r = expert_choice_routing(jnp.log(p), capacity=2)
    np.testing.assert_array_equal(r.token_index, [[0, 2], [1, 2]])
    np.testing.assert_allclose(r.weight, [[0.7, 0.6], [0.8, 0.4]], rtol=1e-6)
    assert r.num_tokens == 3 and r.capacity == 2
    with pytest.raises(ValueError, match="capacity=4"):
        expert_choice_routing(jnp.log(p), capacity=4)


def test_load_balance_loss_hand_computed():
    probs = jnp.array([[0.75, 0.25], [0.6, 0.4]])
    idx = jnp.array([[0], [0]])
    # f = [1, 0], P = [0.675, 0.325] -> 2 * 0.675
    np.testing.assert_allclose(load_balance_loss(probs, idx, jnp.ones((2, 1), bool)), 1.35, rtol=1e-6)
    uniform = jnp.full((4, 4), 0.25)
    np.testing.assert_allclose(load_balance_loss(uniform, jnp.arange(4)[:, None], jnp.ones((4, 1), bool)), 1.0,
                               rtol=1e-6)


def test_load_balance_loss_ignores_invalid_slots():
    probs = jnp.array([[0.5, 0.5], [0.5, 0.5]])
    idx = jnp.array([[0], [1]])
    valid = jnp.array([[True], [False]])
    np.testing.assert_allclose(load_balance_loss(probs, idx, valid), 1.0, rtol=1e-6)   # f = [1, 0], P = .5


def test_z_loss_and_importance_loss_hand_computed():
    np.testing.assert_allclose(router_z_loss(jnp.zeros((3, 2))), math.log(2) ** 2, rtol=1e-6)
    w = jnp.array([[0.75], [0.6]])
    idx = jnp.array([[0], [0]])
    # importance = [1.35, 0]: mean .675, variance .675^2 -> CV^2 = 1
    np.testing.assert_allclose(importance_loss(w, idx, jnp.ones((2, 1), bool), 2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(importance_loss(jnp.ones((2, 1)), jnp.array([[0], [1]]), jnp.ones((2, 1), bool), 2),
                               0.0, atol=1e-7)


def test_routing_statistics():
    r = top_k_routing(jnp.zeros((4, 4)), 1)
    np.testing.assert_allclose(r.entropy, math.log(4), rtol=1e-6)
    np.testing.assert_allclose(r.confidence, 0.25, rtol=1e-6)
    np.testing.assert_allclose(r.expert_load.sum(), 1.0, rtol=1e-6)


def test_aux_free_bias_update_moves_towards_balance():
    bias = jnp.zeros(3)
    new = aux_free_bias_update(bias, jnp.array([0.6, 0.3, 0.1]), rate=0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.01], atol=1e-7)  # mean load 1/3


def _router_vars(cfg, x, num_experts=4):
    return nn.unbox(Router(num_experts, cfg).init(jax.random.key(0), x))


def test_jitter_only_in_training_and_reproducible():
    x = jax.random.normal(jax.random.key(1), (64, 8))
    cfg = RouterConfig(k=1, jitter_noise=0.5)
    router = Router(4, cfg)
    v = _router_vars(cfg, x)
    eval_a = router.apply(v, x, deterministic=True)
    eval_b = router.apply(v, x, deterministic=True, rngs={"jitter": jax.random.key(5)})
    np.testing.assert_array_equal(eval_a.weight, eval_b.weight)
    train_a = router.apply(v, x, deterministic=False, rngs={"jitter": jax.random.key(5)})
    train_b = router.apply(v, x, deterministic=False, rngs={"jitter": jax.random.key(5)})
    train_c = router.apply(v, x, deterministic=False, rngs={"jitter": jax.random.key(6)})
    np.testing.assert_array_equal(train_a.weight, train_b.weight)
    assert not np.allclose(train_a.weight, train_c.weight)
    assert not np.allclose(train_a.weight, eval_a.weight)


def test_router_selection_bias_lives_in_moe_state():
    x = jax.random.normal(jax.random.key(1), (16, 8))
    cfg = RouterConfig(k=1, selection_bias=True)
    v = _router_vars(cfg, x)
    assert v["moe_state"]["selection_bias"].shape == (4,)
    v = {"params": v["params"], "moe_state": {"selection_bias": jnp.array([0.0, 0.0, 5.0, 0.0])}}
    r = Router(4, cfg).apply(v, x)
    np.testing.assert_array_equal(r.expert_index, 2)


def test_router_kernel_has_logical_axes():
    x = jnp.ones((2, 8))
    boxed = Router(4, RouterConfig(k=1)).init(jax.random.key(0), x)
    assert boxed["params"]["kernel"].names == ("embed", "expert")


def test_router_expert_choice_needs_capacity():
    x = jnp.ones((2, 8))
    cfg = RouterConfig(kind="expert_choice", k=1)
    with pytest.raises(ValueError, match="capacity"):
        Router(4, cfg).init(jax.random.key(0), x)


def test_selection_bias_is_updated_in_training_when_mutable():
    x = jax.random.normal(jax.random.key(1), (32, 8))
    cfg = RouterConfig(k=1, selection_bias=True, bias_update_rate=0.1)
    router = Router(4, cfg)
    v = _router_vars(cfg, x)
    r, new = router.apply(v, x, deterministic=False, mutable=["moe_state"])
    want = aux_free_bias_update(v["moe_state"]["selection_bias"], r.expert_load, 0.1)
    np.testing.assert_allclose(new["moe_state"]["selection_bias"], want)
    assert float(jnp.abs(want).max()) > 0
    _, same = router.apply(v, x, deterministic=True, mutable=["moe_state"])       # evaluation: no update
    np.testing.assert_array_equal(same["moe_state"]["selection_bias"], 0.0)


def test_bias_update_rate_validated():
    with pytest.raises(ValueError, match="router.bias_update_rate=-1"):
        RouterConfig(bias_update_rate=-1.0)


def test_docs_list_every_registered_kind_and_transform():
    import pathlib

    from moejax.routing import plugin
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "routing_mechanisms.md").read_text()
    builtin = [k for k in plugin.router_kinds() if plugin.router_kind(k).__module__.startswith("moejax.")]
    for name in builtin:
        assert f"`{name}`" in text, f"router kind {name!r} missing from docs/routing_mechanisms.md"
    for name, cls in plugin.transforms().items():
        if cls.__module__.startswith("moejax."):
            assert f"| `{name}` (" in text, f"transform {name!r} missing from docs/routing_mechanisms.md"


def test_selection_bias_without_moe_state_is_a_clear_error():
    cfg = RouterConfig(k=1, selection_bias=True)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    variables = Router(4, cfg).init(jax.random.key(1), x)
    assert set(variables) == {"params", "moe_state"}
    with pytest.raises(ValueError, match=r"^moe_state: router\.selection_bias=True keeps its bias"):
        Router(4, cfg).apply({"params": variables["params"]}, x)
