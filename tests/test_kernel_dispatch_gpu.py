"""The Pallas Triton capacity dispatch/combine kernels (``moejax.kernels.capacity_pallas_triton``): interpret mode
on CPU against ``moejax.kernels.reference`` (values and the gradients of x, y and weight), argument errors, and
lowering for CUDA on CPU (the Triton custom call; nothing is compiled by Triton or run on a GPU).

Interpret mode compiles slowly, so, as in ``tests/test_kernel_dispatch.py``, shapes come from a small fixed set and
every checked function is jitted once per (shape, dtype): hypothesis examples change the plans and the data and
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

import test_kernel_dispatch
from moejax import MoELayer, kernels
from moejax.dispatch import capacity
from moejax.dispatch.backends import forget_logged
from moejax.kernels import reference
from test_kernel_dispatch import greedy_plan
from test_kernel_lowering import lowered_kernels
from test_layer import X_SHAPE, make_config

# (T, K, E, C, D). "odd" and "c1" are token-choice shapes (the plans of test_kernel_dispatch.greedy_plan); "ec" is
# an expert-choice table, K = E. TILING's td=8 is below D=13 (two column tiles, the second ragged) and covers D=7
# in one tile of 8; tm=2 leaves a ragged last row tile for odd T and S.
SHAPES = {**test_kernel_dispatch.SHAPES, "ec": (9, 4, 4, 3, 13)}
TILING = (2, 8)
TOKEN_CHOICE_KINDS = ["random", "hot", "empty_experts", "all_dropped"]
EXPERT_CHOICE_KINDS = ["full", "partial", "all_dropped"]


def expert_choice_plan(kind: str, rng) -> np.ndarray:
    """slot_of_copy int32[T, E]: expert ``e`` takes up to C distinct tokens (``partial``: a random number of them,
    so some slots stay empty; ``all_dropped``: none); copy ``(t, e)`` is out of range where ``e`` did not take t."""
    t, k, e, c, _ = SHAPES["ec"]
    assert k == e
    slot = rng.choice([e * c, e * c + 5, -1], size=(t, e)).astype(np.int32)
    for ex in range(e):
        n = {"full": c, "partial": rng.integers(0, c + 1), "all_dropped": 0}[kind]
        for ci, tok in enumerate(rng.choice(t, size=n, replace=False)):
            slot[tok, ex] = ex * c + ci
    return slot


@st.composite
def cases(draw, shapes):
    shape = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if shape == "ec":
        return shape, expert_choice_plan(draw(st.sampled_from(EXPERT_CHOICE_KINDS)), rng), rng
    return shape, greedy_plan(shape, draw(st.sampled_from(TOKEN_CHOICE_KINDS)), rng), rng


_dispatch = functools.partial(kernels.capacity_dispatch_triton, tiling=TILING, interpret=True)
_combine = functools.partial(kernels.capacity_combine_triton, tiling=TILING, interpret=True)
_kernel = test_kernel_dispatch.values_and_grads_of(_dispatch, _combine)


def _check(shape: str, slot: np.ndarray, rng, dtype, tol):
    return test_kernel_dispatch.check_against_reference(_kernel, SHAPES[shape], slot, rng, dtype, tol)


@settings(max_examples=14)
@given(cases(sorted(SHAPES)))
def test_dispatch_and_combine_match_reference_float32(case):
    shape, slot, rng = case
    _check(shape, slot, rng, jnp.float32, dict(rtol=1e-5, atol=1e-5))


@settings(max_examples=6)
@given(cases(["odd", "ec"]))
def test_dispatch_and_combine_bfloat16_match_reference(case):
    shape, slot, rng = case
    # Dispatch is a copy (exact); combine and d_x sum up to K bfloat16 rows in float32 on both sides, then round.
    buf, out, _, d_y, _ = _check(shape, slot, rng, jnp.bfloat16, dict(rtol=1e-2, atol=1e-2))
    assert buf.dtype == out.dtype == d_y.dtype == jnp.bfloat16


_gather_rows = jax.jit(kernels.gather_rows_triton, static_argnames=("interpret",))
_gather_sum = jax.jit(kernels.gather_sum_triton, static_argnames=("interpret",))


def test_gather_kernels_default_tiling_skip_dead_rows():
    # Default tiling: one row tile larger than R and T, D=5 in one column tile of 8. Indices below 0 and past the
    # end, zero scales and weights. Rows 4 and 5 of x are NaN and referenced only by dead entries: a dead entry
    # that were read (and multiplied by zero) would leak NaN into the output. (The one-hot reference multiplies
    # every row, so it sees them as zeros.)
    rng = np.random.default_rng(1)
    clean = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32).at[4:].set(0.0)
    x = clean.at[4:].set(jnp.nan)
    src = jnp.array([5, -1, 0, 6, 2, 2, 40, 3, 1, 4], jnp.int32)
    scale = jnp.array([0.0, 1.0, 0.5, 1.0, 0.0, -2.0, 1.0, 3.0, 1.0, 0.0], jnp.float32)
    rows = _gather_rows(x, src, scale, interpret=True)
    np.testing.assert_allclose(rows, reference.gather_rows(clean, src, scale), rtol=1e-6)
    np.testing.assert_array_equal(rows[jnp.array([0, 1, 3, 4, 6, 9])], 0.0)
    idx = jnp.array([[0, 8, -3], [2, 2, 1], [9, 9, 9], [4, 0, 3], [5, 5, 1]], jnp.int32)
    w = jnp.array([[1.0, 1.0, 1.0], [0.5, 0.25, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, -1.0], [0.0, 0.0, 3.0]],
                  jnp.float32)
    sums = _gather_sum(x, idx, w, interpret=True)
    np.testing.assert_allclose(sums, reference.gather_sum(clean, idx, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sums[1], 0.75 * x[2], rtol=1e-6)                  # a row repeated in one token
    np.testing.assert_array_equal(sums[2], 0.0)                                  # every entry out of range
    np.testing.assert_allclose(sums[3], 2.0 * x[0] - x[3], rtol=1e-6)            # the NaN row 4 has weight 0
    # bfloat16 rows, float32 result: the accumulation is float32, not rounded to bfloat16.
    y16 = clean.astype(jnp.bfloat16)
    sums32 = kernels.gather_sum_triton(y16, idx, w, interpret=True, preferred_element_type=jnp.float32)
    assert sums32.dtype == jnp.float32
    np.testing.assert_allclose(sums32, reference.gather_sum(y16, idx, w, preferred_element_type=jnp.float32),
                               rtol=1e-6, atol=1e-6)


def test_vmapped_dispatch_and_combine_match_reference():
    test_kernel_dispatch.check_vmapped(_dispatch, _combine)


def test_rejects_bad_arguments_naming_them():
    x, i2, ones2 = jnp.ones((3, 2)), jnp.zeros(2, jnp.int32), jnp.ones(2)
    bad = [
        (lambda: kernels.gather_rows_triton(x, i2, ones2, tiling=(3, 8)), "gather_rows_triton: tiling=\\(3, 8\\)"),
        (lambda: kernels.gather_rows_triton(x, i2, ones2, tiling=(8,)), "gather_rows_triton: tiling="),
        (lambda: kernels.gather_rows_triton(x, i2, ones2, num_warps=3), "gather_rows_triton: num_warps=3"),
        (lambda: kernels.gather_rows_triton(x, i2, ones2, num_stages=0), "gather_rows_triton: num_stages=0"),
        (lambda: kernels.gather_rows_triton(x, ones2, ones2), "gather_rows_triton: src must be integer"),
        (lambda: kernels.gather_rows_triton(x, i2, jnp.ones(3)), "gather_rows_triton: src and scale"),
        (lambda: kernels.gather_rows_triton(jnp.ones(3), i2, ones2), "gather_rows_triton: x\\[T, D\\]"),
        (lambda: kernels.gather_sum_triton(x, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 3))),
         "gather_sum_triton: idx\\[T, K\\] and w\\[T, K\\] must have the same shape"),
        (lambda: kernels.gather_sum_triton(x, jnp.zeros((2, 2)), jnp.ones((2, 2))), "gather_sum_triton: idx must be"),
        (lambda: kernels.capacity_dispatch_triton(x, jnp.zeros((4, 1), jnp.int32), 6), "dispatch_triton: .*T=4"),
        (lambda: kernels.capacity_dispatch_triton(x, jnp.zeros((3, 1), jnp.int32), 6, tiling=(4, 6)),
         "capacity_dispatch_triton: tiling"),
        (lambda: kernels.capacity_combine_triton(x, jnp.zeros((4, 1)), jnp.ones((4, 1))),
         "capacity_combine_triton: slot_of_copy must be integer"),
        (lambda: kernels.capacity_combine_triton(x, jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 2))),
         "capacity_combine_triton: weight"),
    ]
    for fn, match in bad:
        with pytest.raises(ValueError, match=match):
            fn()


def test_capacity_impl_pallas_triton_is_refused_on_tpu(monkeypatch):
    plan = capacity.TokenChoicePlan(expert_index=jnp.zeros((2, 1), jnp.int32), position=jnp.zeros((2, 1), jnp.int32),
                                    kept=jnp.ones((2, 1), bool), weight=jnp.ones((2, 1)), capacity=1, num_experts=2)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="dispatch.capacity_impl='pallas_triton': .*only on GPU"):
        capacity.dispatch(plan, jnp.ones((2, 3)), "pallas_triton")


# ---------------------------------------------------------------- lowering for CUDA (on CPU, nothing compiled)

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("router", ["gshard_top2", "expert_choice"])
def test_layer_with_capacity_impl_pallas_on_gpu_lowers_to_triton(router, monkeypatch, caplog):
    # capacity_impl='pallas' picks the Triton kernels when the default backend is a GPU. No GPU here: pretend the
    # default backend is one while tracing, and lower the layer's forward and backward for CUDA.
    cfg = make_config(router, "capacity_einsum")
    cfg = dataclasses.replace(cfg, dispatch=dataclasses.replace(cfg.dispatch, capacity_impl="pallas"))
    x = S(X_SHAPE, jnp.float32)
    params = nn.unbox(jax.eval_shape(MoELayer(cfg).init, jax.random.key(1), x))["params"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    forget_logged()

    def loss(p, xx):
        y = MoELayer(cfg).apply({"params": p}, xx, deterministic=False).y
        return jnp.sum(y ** 2)

    with caplog.at_level("INFO", logger="moejax"):
        n = lowered_kernels(jax.grad(loss, argnums=(0, 1)), params, x, platform="cuda")
    assert "dispatch.capacity_impl=pallas -> pallas_triton (Triton kernels) on backend gpu" in caplog.text
    assert n == 5
