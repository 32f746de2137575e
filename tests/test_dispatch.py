"""Capacity and dropless dispatch: hand-computed cases, invariants (hypothesis) and the grouped matmuls."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from moejax import reference
from moejax.dispatch import capacity, dropless, get_gmm, gmm, padded_gmm
from moejax.routing import finish_token_choice, top_k_routing


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


# ---------------------------------------------------------------- grouped matmul

GMMS = ["blocked", "bulk", "padded", "pallas", "pallas_triton", "ragged_dot", "reference"]


GMM_ROWS = 48


@st.composite
def gmm_cases(draw):
    e = draw(st.sampled_from([1, 4, 6]))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 3, 7, 8]), min_size=e, max_size=e))
    k = draw(st.sampled_from([5, 8]))
    tile = draw(st.sampled_from([4, 16, 128]))
    return sizes, k, tile, draw(st.integers(0, 2**16))


@functools.lru_cache(maxsize=None)
def _gmm_value_and_grads(name, tile):
    fn = get_gmm(name, tile=tile)

    def run(f, lhs, rhs, gs, cot):
        out = f(lhs, rhs, gs)
        grads = jax.grad(lambda a, b: jnp.sum(f(a, b, gs) * cot), argnums=(0, 1))(lhs, rhs)
        return out, grads

    return jax.jit(functools.partial(run, fn)), jax.jit(functools.partial(run, reference.gmm))


@given(gmm_cases(), st.sampled_from(GMMS))
@example(([3, 0, 8, 7], 5, 16, 1), "pallas_triton")    # the derandomized draws miss it: empty and straddling groups
def test_gmm_matches_reference_values_and_gradients(case, name):
    sizes, k, tile, seed = case
    rng = np.random.default_rng(seed)
    m, n = GMM_ROWS, 3                               # rows past the last group stay unassigned
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    fast, slow = _gmm_value_and_grads(name, tile)
    out, g = fast(lhs, rhs, gs, cot)
    want, g_ref = slow(lhs, rhs, gs, cot)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)
    np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-5)
    for e, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(g[1][e], 0.0)   # empty group: weight gradient exactly zero


@pytest.mark.parametrize("name", GMMS)
@pytest.mark.parametrize("m", [1, 13])
def test_gmm_odd_row_counts(name, m):
    lhs = jnp.arange(m * 3, dtype=jnp.float32).reshape(m, 3)
    rhs = jnp.stack([jnp.eye(3), 2 * jnp.eye(3)])
    gs = jnp.array([m // 2, m - m // 2], jnp.int32)
    np.testing.assert_allclose(get_gmm(name, tile=4)(lhs, rhs, gs), reference.gmm(lhs, rhs, gs), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _padded_value_and_grads(bulk, tile):
    def run(f, lhs, rhs, gs, cot):
        return f(lhs, rhs, gs), jax.grad(lambda a, b: jnp.sum(f(a, b, gs) * cot), argnums=(0, 1))(lhs, rhs)

    fast = functools.partial(padded_gmm.gmm_padded, tile=tile, bulk=bulk)
    return jax.jit(functools.partial(run, fast)), jax.jit(functools.partial(run, reference.gmm))


_jit_layout = jax.jit(padded_gmm.layout, static_argnums=(1, 2, 3))


@given(st.lists(st.sampled_from([0, 0, 1, 2, 5, 9, 17]), min_size=4, max_size=4), st.sampled_from([0, 1, 3, 8]),
       st.sampled_from([1, 4]))
def test_padded_gmm_bulk_and_overflow_match_reference(sizes, bulk, tile):
    # The bulk slabs (first `bulk` rows of each group) and the tiled overflow split every group at `bulk`;
    # sizes straddle it (empty groups, groups inside the slab, hot groups far past it).
    rng = np.random.default_rng(sum(sizes) + bulk)
    m = 70                                            # >= 4 * 17: rows past the last group stay unassigned
    lhs = jnp.asarray(rng.normal(size=(m, 3)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), 3, 2)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(m, 2)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    fast, slow = _padded_value_and_grads(bulk, tile)
    out, g = fast(lhs, rhs, gs, cot)
    want, g_ref = slow(lhs, rhs, gs, cot)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    lay = _jit_layout(gs, m, tile, bulk)             # every row lands in exactly one padded row, in the counted work
    src = np.asarray(lay.src)
    np.testing.assert_array_equal(np.sort(src[src < m]), np.arange(sum(sizes)))
    assert padded_gmm.padded_rows(sizes, tile, bulk) == len(sizes) * bulk + int(lay.num_blocks) * tile


def test_blocked_gmm_work_is_not_e_times():
    # Work items are bounded by ceil(M / tile) + E - 1, whatever the group sizes.
    gs = jnp.array([0, 5, 0, 0, 30, 1, 0, 28], jnp.int32)
    tile_of, group_of, active = gmm._work_items(gs, num_tiles=4, tile=16)
    assert tile_of.shape == (4 + 8 - 1,)
    pairs = {(int(t), int(g)) for t, g, a in zip(tile_of, group_of, active) if a}
    needed = {(r // 16, e) for e, (s, n) in enumerate(zip(np.cumsum(gs) - gs, gs)) for r in range(s, s + n)}
    assert needed <= pairs


def test_blocked_gmm_in_bfloat16_accumulates_in_float32():
    lhs = jnp.ones((64, 256), jnp.bfloat16) * 0.01
    rhs = jnp.ones((2, 256, 4), jnp.bfloat16)
    out = gmm.gmm_blocked(lhs, rhs, jnp.array([32, 32], jnp.int32), tile=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 2.56, rtol=1e-2)


def test_gmm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="K=3"):
        gmm.gmm_blocked(jnp.ones((4, 2)), jnp.ones((1, 3, 2)), jnp.array([4]))


def test_auto_resolves_per_backend_and_logs(caplog):
    assert gmm.resolve_name("auto", "cpu") == "bulk"
    assert gmm.resolve_name("auto", "gpu") == "ragged_dot"
    with caplog.at_level("INFO", logger="moejax"):
        get_gmm("auto")
    assert "dispatch.gmm=auto -> bulk" in caplog.text


def test_register_custom_gmm():
    calls = []

    def mine(lhs, rhs, gs):
        calls.append(1)
        return reference.gmm(lhs, rhs, gs)

    gmm.register_gmm("test_mine", mine)
    fn = get_gmm("test_mine")
    fn(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]))
    assert calls and "test_mine" in gmm.available()
