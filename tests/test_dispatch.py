"""Capacity and dropless dispatch: hand-computed cases and invariants (hypothesis).

The grouped matmuls of dropless dispatch are tested per backend in tests/test_gmm_backends.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax import reference
from moejax.dispatch import capacity, dropless
from moejax.routing import finish_token_choice, top_k_routing

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised


def routing_from(expert_index, weight, valid=None, num_experts=None):
    """A token-choice Routing from explicit choices (probs uniform; only used for the losses)."""
    expert_index = jnp.asarray(expert_index, jnp.int32)
    weight = jnp.asarray(weight, jnp.float32)
    valid = jnp.ones(expert_index.shape, bool) if valid is None else jnp.asarray(valid, bool)
    e = num_experts or int(expert_index.max()) + 1
    probs = jnp.full((expert_index.shape[0], e), 1.0 / e)
    return finish_token_choice(jnp.zeros_like(probs), probs, expert_index, weight, valid)


# ---------------------------------------------------------------- hand-computed capacity cases

def test_position_priority_keeps_earliest_tokens():
    r = routing_from([[0], [0], [0], [0]], [[0.6], [0.9], [0.7], [0.8]], num_experts=2)
    plan = capacity.plan_token_choice(r, capacity=2, priority="position")
    np.testing.assert_array_equal(plan.kept[:, 0], [True, True, False, False])
    np.testing.assert_array_equal(plan.position[:2, 0], [0, 1])


def test_score_priority_keeps_highest_weights():
    r = routing_from([[0], [0], [0], [0]], [[0.6], [0.9], [0.7], [0.8]], num_experts=2)
    plan = capacity.plan_token_choice(r, capacity=2, priority="score")
    np.testing.assert_array_equal(plan.kept[:, 0], [False, True, False, True])
    np.testing.assert_array_equal(plan.position[[1, 3], 0], [0, 1])


def test_first_choices_take_slots_before_second_choices():
    # Token 0's second choice (expert 1) comes after token 1's first choice (also expert 1).
    r = routing_from([[0, 1], [1, 0]], [[0.6, 0.4], [0.7, 0.3]], num_experts=2)
    plan = capacity.plan_token_choice(r, capacity=1, priority="position")
    np.testing.assert_array_equal(plan.kept, [[True, False], [True, False]])


def test_dropped_copies_contribute_nothing_and_weights_are_applied():
    r = routing_from([[0], [0], [1]], [[0.5], [0.25], [2.0]], num_experts=2)
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    for impl in ("einsum", "index"):
        plan = capacity.plan_token_choice(r, capacity=1)
        buf = capacity.dispatch(plan, x, impl)
        np.testing.assert_allclose(buf, [[[1.0, 2.0]], [[5.0, 6.0]]])
        out = capacity.combine(plan, buf * 10.0, impl)   # "expert" multiplies by 10
        np.testing.assert_allclose(out, [[5.0, 10.0], [0.0, 0.0], [100.0, 120.0]], rtol=1e-6)


def test_invalid_slots_take_no_capacity():
    r = routing_from([[0], [0], [0]], [[1.0], [1.0], [1.0]], valid=[[False], [True], [True]], num_experts=1)
    plan = capacity.plan_token_choice(r, capacity=1)
    np.testing.assert_array_equal(plan.kept[:, 0], [False, True, False])


# ---------------------------------------------------------------- invariants

# Shapes come from small fixed sets and every check runs jitted, so that examples reuse compilations.
_top_k = jax.jit(top_k_routing, static_argnums=1)
_plan = jax.jit(capacity.plan_token_choice, static_argnums=(1, 2))
_keep_ref = jax.jit(reference.keep_mask, static_argnums=(1, 2))
_dropless_plan = jax.jit(dropless.make_plan)


@jax.jit
def _with_valid(r, valid):
    return finish_token_choice(jnp.log(r.probs), r.probs, r.expert_index, r.weight, valid)


@st.composite
def routings(draw):
    t = draw(st.sampled_from([1, 7, 16]))
    e = draw(st.sampled_from([1, 3, 8]))
    k = draw(st.sampled_from(sorted({1, 2, e} & set(range(1, e + 1)))))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    r = _top_k(jnp.asarray(rng.normal(size=(t, e)) * scale, jnp.float32), k)
    if draw(st.booleans()):
        r = _with_valid(r, jnp.asarray(rng.random((t, k)) < 0.7))
    cap = draw(st.sampled_from(sorted({1, 3, t} & set(range(1, t + 1)))))
    priority = draw(st.sampled_from(["position", "score"]))
    return r, cap, priority


@given(routings())
def test_capacity_plan_invariants(case):
    r, cap, priority = case
    plan = _plan(r, cap, priority)
    kept, pos, idx = np.asarray(plan.kept), np.asarray(plan.position), np.asarray(r.expert_index)
    valid = np.asarray(r.valid)
    assert not (kept & ~valid).any()
    slots = [(idx[t, k], pos[t, k]) for t, k in zip(*np.nonzero(kept))]
    assert len(slots) == len(set(slots)), "two copies share a slot"
    assert all(0 <= p < cap for _, p in slots), "capacity exceeded"
    for e in range(r.num_experts):
        wanted = int(((idx == e) & valid).sum())
        assert int(((idx == e) & kept).sum()) == min(wanted, cap), "greedy fill: an expert with room dropped a copy"
    # The fast plan and the oracle's sequential walk agree copy by copy.
    np.testing.assert_array_equal(kept, _keep_ref(r, cap, priority))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dispatch_combine(r, x, cap, priority, impl):
    plan = capacity.plan_token_choice(r, cap, priority)
    buf = capacity.dispatch(plan, x, impl)
    return plan, buf, capacity.combine(plan, buf, impl)


@given(routings(), st.sampled_from(["einsum", "index"]))
def test_capacity_dispatch_places_each_kept_copy_once(case, impl):
    r, cap, priority = case
    t = r.num_tokens
    x = jnp.arange(t, dtype=jnp.float32)[:, None] + 1.0          # token t carries value t + 1
    plan, buf, out = _dispatch_combine(r, x, cap, priority, impl)
    expected = np.zeros((r.num_experts, cap))
    for ti, ki in zip(*np.nonzero(np.asarray(plan.kept))):
        expected[int(r.expert_index[ti, ki]), int(plan.position[ti, ki])] += ti + 1
    np.testing.assert_array_equal(np.asarray(buf)[..., 0], expected)
    # Identity experts: each token gets back the sum of its kept weights times itself; dropped copies add nothing.
    np.testing.assert_allclose(out[:, 0], np.asarray(plan.weight).sum(-1) * (np.arange(t) + 1), rtol=1e-5, atol=1e-6)


@jax.jit
def _dropless_roundtrip(r, x):
    plan = dropless.make_plan(r)
    return plan, dropless.combine(plan, dropless.dispatch(plan, x))


@given(routings())
def test_dropless_plan_groups_every_valid_copy_once(case):
    r, _, _ = case
    x = jnp.arange(r.num_tokens, dtype=jnp.float32)[:, None] + 1.0
    plan, out = _dropless_roundtrip(r, x)
    valid = np.asarray(r.valid)
    idx = np.asarray(r.expert_index)
    np.testing.assert_array_equal(plan.group_sizes, [((idx == e) & valid).sum() for e in range(r.num_experts)])
    n_valid = int(valid.sum())
    # Rows of each group hold exactly the tokens that chose that expert.
    ends = np.cumsum(plan.group_sizes)
    starts = ends - np.asarray(plan.group_sizes)
    for e in range(r.num_experts):
        rows = np.asarray(plan.row_token)[starts[e]:ends[e]]
        np.testing.assert_array_equal(np.sort(rows), np.sort(np.nonzero(((idx == e) & valid).any(-1))[0]))
    np.testing.assert_array_equal(np.asarray(plan.row_weight)[n_valid:], 0.0)
    np.testing.assert_allclose(out[:, 0], np.asarray(r.weight).sum(-1) * (np.arange(r.num_tokens) + 1), rtol=1e-5)
