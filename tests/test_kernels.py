"""Pallas grouped-matmul kernels in interpret mode against the pure-jnp references: values and gradients.

Shapes are fixed (M, K, N deliberately not multiples of the tiles) and every checked function is jitted
once per dtype, so that hypothesis examples only change the group sizes and reuse the compilations.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.kernels import gmm, reference, tgmm, work_items

M, K, N, E = 37, 20, 13, 6
TILING = (8, 8, 8)


@st.composite
def group_sizes(draw):
    kind = draw(st.sampled_from(["random", "hot", "all_in_one", "zeros", "last_only"]))
    if kind == "random":
        sizes = draw(st.lists(st.sampled_from([0, 0, 1, 3, 7, 8, 9]), min_size=E, max_size=E))
        while sum(sizes) > M:                                  # keep sum(group_sizes) <= M
            sizes[int(np.argmax(sizes))] -= 1
    else:
        sizes = [0] * E
        if kind == "hot":
            sizes[draw(st.integers(0, E - 1))] = draw(st.integers(1, M))
        elif kind == "all_in_one":
            sizes[draw(st.integers(0, E - 1))] = M
        elif kind == "last_only":
            sizes[-1] = draw(st.integers(1, M))
    return sizes


def _operands(seed: int, dtype):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
    rhs = jnp.asarray(rng.normal(size=(E, K, N)), dtype)
    cot = jnp.asarray(rng.normal(size=(M, N)), dtype)
    return lhs, rhs, cot


def _value_and_grads(f, lhs, rhs, gs, cot):
    out, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
    return out, vjp(cot)


_kernel = jax.jit(functools.partial(_value_and_grads, functools.partial(gmm, tiling=TILING, interpret=True)))
_oracle = jax.jit(functools.partial(_value_and_grads, reference.gmm))


def _check_against_reference(sizes, seed, dtype, tol):
    lhs, rhs, cot = _operands(seed, dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    out, (d_lhs, d_rhs) = _kernel(lhs, rhs, gs, cot)
    want, (w_lhs, w_rhs) = _oracle(lhs, rhs, gs, cot)
    assert out.dtype == dtype and d_lhs.dtype == dtype and d_rhs.dtype == dtype
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(want), **tol)
    np.testing.assert_allclose(f32(d_lhs), f32(w_lhs), **tol)
    np.testing.assert_allclose(f32(d_rhs), f32(w_rhs), **tol)
    total = sum(sizes)
    np.testing.assert_array_equal(f32(out)[total:], 0.0)        # rows past all groups
    np.testing.assert_array_equal(f32(d_lhs)[total:], 0.0)
    for e, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(f32(d_rhs)[e], 0.0)   # empty group: weight gradient exactly zero


@given(group_sizes(), st.integers(0, 2**16))
def test_gmm_float32_matches_reference_values_and_gradients(sizes, seed):
    _check_against_reference(sizes, seed, jnp.float32, dict(rtol=1e-5, atol=1e-5))


@settings(max_examples=8)
@given(group_sizes(), st.integers(0, 2**16))
def test_gmm_bfloat16_is_close_to_reference(sizes, seed):
    # Both sides accumulate in float32 but round inputs/outputs to bfloat16; K=20 keeps the error small.
    _check_against_reference(sizes, seed, jnp.bfloat16, dict(rtol=5e-2, atol=1e-1))


_tgmm_kernel = jax.jit(functools.partial(tgmm, tiling=TILING, interpret=True))


@given(group_sizes(), st.integers(0, 2**16))
def test_tgmm_matches_reference(sizes, seed):
    lhs, _, cot = _operands(seed, jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = _tgmm_kernel(lhs, cot, gs)
    assert out.shape == (E, K, N)
    np.testing.assert_allclose(out, reference.tgmm(lhs, cot, gs), rtol=1e-5, atol=1e-5)
    for e, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(out[e], 0.0)


def test_gmm_with_the_default_tiling_on_small_odd_shapes():
    # One tile larger than every dimension: the padding path, a single work item per group.
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    gs = jnp.array([2, 2], jnp.int32)
    out = gmm(lhs, rhs, gs, interpret=True, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[4], 0.0)


def test_work_items_cover_every_group_row_within_the_static_bound():
    gs = jnp.array([0, 5, 0, 0, 30, 1, 0, 28], jnp.int32)
    items = work_items(gs, num_tiles=4, tm=16)
    assert items.tile.shape == (4 + 8 - 1,)
    covered = np.zeros(64, int)
    for t, g, lo, hi in zip(items.tile, items.group, items.lo, items.hi):
        assert t * 16 <= lo <= hi <= t * 16 + 16 or lo == hi
        covered[int(lo):int(hi)] += 1
    np.testing.assert_array_equal(covered, (np.arange(64) < int(gs.sum())).astype(int))   # each row exactly once
    # Items are in row order, so an output block is never revisited after another one.
    assert np.all(np.diff(np.asarray(items.tile)) >= 0) and np.all(np.diff(np.asarray(items.group)) >= 0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="K=3"):
        gmm(jnp.ones((4, 2)), jnp.ones((1, 3, 2)), jnp.array([4]), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.array([4]), interpret=True)
    with pytest.raises(ValueError, match="M=5"):
        tgmm(jnp.ones((4, 3)), jnp.ones((5, 2)), jnp.array([4]), interpret=True)
    with pytest.raises(ValueError, match="tiling"):
        gmm(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4]), tiling=(8, 0, 8), interpret=True)
