"""Capacity dispatch/combine kernels (Pallas interpret mode) against their pure-jnp references, and the MoE layer
with ``dispatch.capacity_impl='pallas'`` against ``moejax.reference`` (values and gradients).

Interpret mode compiles slowly, so shapes come from a small fixed set and every checked function is jitted once per
(shape, dtype): hypothesis examples change the plans (hot expert, empty experts, dropped copies) and the data, and
reuse the compilations.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import test_parallel
from moejax import MoELayer, kernels, parallel
from moejax.dispatch import capacity
from moejax.dispatch.backends import forget_logged
from moejax.kernels import reference
from moejax.parallel import MeshConfig, make_mesh
from test_layer import init, make_config, values_and_grads
from trees import assert_trees_close

# (T, K, E, C, D). TILING's td=8 is below D=13 (padded to 16, two column tiles) and above D=7 (one whole tile);
# tm=2 leaves a partial row tile for odd T and S.
SHAPES = {"odd": (11, 3, 4, 3, 13), "c1": (5, 2, 3, 1, 7)}
TILING = (2, 8)


def greedy_plan(shape: str, kind: str, rng) -> np.ndarray:
    """slot_of_copy int32[T, K] filled greedily in token order, as capacity dispatch does; overflow and invalid
    copies get an out-of-range slot (E*C, beyond it, or negative)."""
    t, k, e, c, _ = SHAPES[shape]
    if kind == "hot":
        expert = np.full((t, k), rng.integers(e))                 # every copy to one expert: most overflow
    elif kind == "empty_experts":
        expert = rng.choice([0, e - 1], size=(t, k))              # the experts in between get nothing
    else:
        expert = rng.integers(0, e, size=(t, k))
    valid = rng.random((t, k)) < (0.0 if kind == "all_dropped" else 0.8)
    fill = np.zeros(e, int)
    slot = np.empty((t, k), np.int32)
    for ti in range(t):
        for ki in range(k):
            ex = expert[ti, ki]
            if valid[ti, ki] and fill[ex] < c:
                slot[ti, ki] = ex * c + fill[ex]
                fill[ex] += 1
            else:
                slot[ti, ki] = rng.choice([e * c, e * c + 5, -1])
    return slot


@st.composite
def plans(draw, shape: str):
    kind = draw(st.sampled_from(["random", "hot", "empty_experts", "all_dropped"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return greedy_plan(shape, kind, rng), rng


def _operands(dims, rng, dtype):
    """x [T, D], y [S, D], weight [T, K] (float32) and the cotangents of buf [S, D] and out [T, D] for (T, K, E, C, D)."""
    t, k, e, c, d = dims
    normal = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return normal(t, d), normal(e * c, d), jnp.asarray(rng.normal(size=(t, k)), jnp.float32), \
        normal(e * c, d), normal(t, d)


def _values_and_grads(dispatch, combine, num_slots, x, y, w, slot, cot_buf, cot_out):
    buf, vjp_d = jax.vjp(lambda a: dispatch(a, slot, num_slots), x)
    out, vjp_c = jax.vjp(lambda a, b: combine(a, slot, b), y, w)
    return buf, out, vjp_d(cot_buf)[0], *vjp_c(cot_out)


def values_and_grads_of(dispatch, combine):
    """``(num_slots, x, y, w, slot, cot_buf, cot_out) -> (buf, out, d_x, d_y, d_w)`` of a dispatch/combine pair, jitted."""
    return jax.jit(functools.partial(_values_and_grads, dispatch, combine), static_argnums=0)


_kernel = values_and_grads_of(functools.partial(kernels.capacity_dispatch, tiling=TILING, interpret=True),
                              functools.partial(kernels.capacity_combine, tiling=TILING, interpret=True))
_oracle = values_and_grads_of(reference.capacity_dispatch, reference.capacity_combine)
NAMES = ("buf", "out", "d_x", "d_y", "d_w")


def check_against_reference(kernel, dims, slot: np.ndarray, rng, dtype, tol):
    """``kernel`` (from :func:`values_and_grads_of`) matches the references on plan ``slot`` for (T, K, E, C, D);
    empty slots, dropped copies and fully dropped tokens give exact zeros. Returns the kernel's results."""
    t, k, e, c, d = dims
    x, y, w, cot_buf, cot_out = _operands(dims, rng, dtype)
    slot = np.asarray(slot)
    got = kernel(e * c, x, y, w, jnp.asarray(slot), cot_buf, cot_out)
    want = _oracle(e * c, x, y, w, jnp.asarray(slot), cot_buf, cot_out)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name, **tol)
    buf, _, d_x, _, d_w = got
    kept = (slot >= 0) & (slot < e * c)
    filled = np.zeros(e * c, bool)
    filled[slot[kept]] = True
    np.testing.assert_array_equal(np.asarray(buf, np.float32)[~filled], 0.0)       # empty slots are exactly zero
    np.testing.assert_array_equal(np.asarray(d_w)[~kept], 0.0)                    # dropped copies: no weight gradient
    np.testing.assert_array_equal(np.asarray(d_x, np.float32)[~kept.any(1)], 0.0)  # fully dropped tokens: no gradient
    return got


def _check(shape: str, slot: np.ndarray, rng, dtype, tol):
    return check_against_reference(_kernel, SHAPES[shape], slot, rng, dtype, tol)


def check_vmapped(dispatch, combine):
    """Routing groups (dispatch.groups > 1) vmap the plan: the pair's custom VJPs and kernels must batch."""
    dims = SHAPES["c1"]
    t, k, e, c, d = dims
    rng = np.random.default_rng(3)
    slots = jnp.asarray(np.stack([greedy_plan("c1", kind, rng) for kind in ("random", "hot")]))
    x, y, w, cot_buf, cot_out = (jnp.stack([a, 2 * a]) for a in _operands(dims, rng, jnp.float32))
    kernel = functools.partial(_values_and_grads, dispatch, combine, e * c)
    oracle = functools.partial(_values_and_grads, reference.capacity_dispatch, reference.capacity_combine, e * c)
    got = jax.jit(jax.vmap(kernel))(x, y, w, slots, cot_buf, cot_out)
    want = jax.jit(jax.vmap(oracle))(x, y, w, slots, cot_buf, cot_out)
    for name, a, b in zip(NAMES, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@settings(max_examples=12)
@given(st.sampled_from(sorted(SHAPES)).flatmap(lambda s: st.tuples(st.just(s), plans(s))))
def test_dispatch_and_combine_match_reference_float32(case):
    shape, (slot, rng) = case
    _check(shape, slot, rng, jnp.float32, dict(rtol=1e-5, atol=1e-5))


@settings(max_examples=6)
@given(plans("odd"))
def test_dispatch_and_combine_bfloat16_match_reference(case):
    slot, rng = case
    # Dispatch is a copy (exact); combine and d_x sum up to K bfloat16 rows in float32 on both sides, then round.
    buf, _, _, d_y, _ = _check("odd", slot, rng, jnp.bfloat16, dict(rtol=1e-2, atol=1e-2))
    assert buf.dtype == jnp.bfloat16 and d_y.dtype == jnp.bfloat16


_gather_rows = jax.jit(kernels.gather_rows, static_argnames=("interpret",))
_gather_sum = jax.jit(kernels.gather_sum, static_argnames=("interpret",))


def test_gather_kernels_default_tiling_out_of_range_and_zero_weights():
    # Default tiling (one row tile larger than R and T, D whole); src/idx below 0 and past the end, zero scales.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    src = jnp.array([5, -1, 0, 6, 2, 2, 40, 3, 1], jnp.int32)
    scale = jnp.array([1.0, 1.0, 0.5, 1.0, 0.0, -2.0, 1.0, 3.0, 1.0], jnp.float32)
    rows = _gather_rows(x, src, scale, interpret=True)
    np.testing.assert_allclose(rows, reference.gather_rows(x, src, scale), rtol=1e-6)
    np.testing.assert_array_equal(rows[jnp.array([1, 3, 4, 6])], 0.0)
    idx = jnp.array([[0, 8, -3], [2, 2, 1], [9, 9, 9], [4, 0, 3]], jnp.int32)     # R = 6 rows of x
    w = jnp.array([[1.0, 1.0, 1.0], [0.5, 0.25, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, -1.0]], jnp.float32)
    sums = _gather_sum(x, idx, w, interpret=True)
    np.testing.assert_allclose(sums, reference.gather_sum(x, idx, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sums[1], 0.75 * x[2], rtol=1e-6)                  # a row repeated in one token
    np.testing.assert_array_equal(sums[2], 0.0)                                  # every entry out of range


def test_kernels_pass_the_tpu_interpreter_race_and_uninitialized_memory_checks():
    # The TPU interpreter runs DMAs only at their wait, fills uninitialized buffers with NaN and records races:
    # stale rows must never leak into outputs and the double-buffered copies must not race.
    ip = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", dma_execution_mode="on_wait")
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.normal(size=(7, 9)), jnp.float32)
    idx = jnp.array([[0, 9, 3], [6, 6, -1], [8, 8, 8], [1, 2, 5], [4, 0, 9]], jnp.int32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32).at[3, 1].set(0.0)
    got = kernels.gather_sum(y, idx, w, tiling=(2, 8), interpret=ip)
    np.testing.assert_allclose(got, reference.gather_sum(y, idx, w), rtol=1e-5, atol=1e-6)
    src, scale = idx[:, 0], w[:, 0].at[1].set(0.0)
    got = kernels.gather_rows(y, src, scale, tiling=(2, 8), interpret=ip)
    np.testing.assert_allclose(got, reference.gather_rows(y, src, scale), rtol=1e-6)
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
    assert not tpu_interpreter.races.races_found


def test_vmapped_dispatch_and_combine_match_reference():
    check_vmapped(functools.partial(kernels.capacity_dispatch, tiling=TILING, interpret=True),
                  functools.partial(kernels.capacity_combine, tiling=TILING, interpret=True))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tiling"):
        kernels.gather_rows(jnp.ones((3, 2)), jnp.zeros(2, jnp.int32), jnp.ones(2), tiling=(0, 8), interpret=True)
    with pytest.raises(ValueError, match="same shape"):
        kernels.gather_sum(jnp.ones((3, 2)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 3)), interpret=True)
    with pytest.raises(ValueError, match="T=4"):
        kernels.capacity_dispatch(jnp.ones((3, 2)), jnp.zeros((4, 1), jnp.int32), 6, interpret=True)
    with pytest.raises(ValueError, match="integer"):
        kernels.capacity_combine(jnp.ones((3, 2)), jnp.zeros((4, 1)), jnp.ones((4, 1)), interpret=True)
    plan = capacity.TokenChoicePlan(expert_index=jnp.zeros((2, 1), jnp.int32), position=jnp.zeros((2, 1), jnp.int32),
                                    kept=jnp.ones((2, 1), bool), weight=jnp.ones((2, 1)), capacity=1, num_experts=2)
    with pytest.raises(ValueError, match="dispatch.capacity_impl='scatter'.*pallas"):
        capacity.dispatch(plan, jnp.ones((2, 3)), "scatter")


# ---------------------------------------------------------------- the layer with capacity_impl='pallas(_triton)'


@pytest.mark.parametrize("router,impl", [("gshard_top2", "pallas"), ("expert_choice", "pallas"),
                                         ("gshard_top2", "pallas_triton")])
def test_layer_with_pallas_capacity_matches_reference(router, impl, caplog):
    base = make_config(router, "capacity_einsum")     # capacity factor 0.75: token-choice copies are dropped
    x, params, state = init(base)                     # same parameters; keeps the (eager) init off the interpreter
    cfg = dataclasses.replace(base, dispatch=dataclasses.replace(base.dispatch, capacity_impl=impl))
    cot = jax.random.normal(jax.random.key(9), x.shape)
    forget_logged()
    with caplog.at_level("INFO", logger="moejax"):
        y, grads = values_and_grads(cfg, False, params, state, x, cot)
    kernels_run = "pallas_triton (Triton" if impl == "pallas_triton" else "pallas_mosaic (Mosaic"
    assert f"dispatch.capacity_impl={impl} -> {kernels_run} kernels in the Pallas interpreter) on backend cpu" \
        in caplog.text
    y_ref, grads_ref = values_and_grads(cfg, True, params, state, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)
    # The router gets its gradient through the combine weights. (That this config and init drop token-choice
    # copies is asserted by tests/test_layer.py::test_capacity_binds_and_stats_match_the_oracle.)
    assert float(jnp.abs(grads[0]["router"]["kernel"]).max()) > 0


@pytest.mark.parametrize("impl", ["pallas", "pallas_triton"])
def test_expert_parallel_pallas_on_cpu_is_a_clear_error(impl):
    # The interpreter cannot run inside the expert-parallel shard_map; the layer says so while tracing.
    base = test_parallel.layer_config("capacity")
    cfg = dataclasses.replace(base, dispatch=dataclasses.replace(base.dispatch, capacity_impl=impl))
    x = jax.ShapeDtypeStruct((8, test_parallel.T // 8, test_parallel.D), jnp.float32)
    params = nn.unbox(jax.eval_shape(MoELayer(cfg).init, jax.random.key(1), x))["params"]   # one device: traces
    mesh = make_mesh(MeshConfig(**test_parallel.MESHES["data2_expert4"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        with pytest.raises(ValueError, match=f"dispatch.capacity_impl='{impl}'.*shard_map"):
            jax.eval_shape(lambda p, xx: MoELayer(cfg).apply({"params": p}, xx, deterministic=False), params, x)
