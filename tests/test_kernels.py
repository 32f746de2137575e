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

import gmm_checks
from moejax.kernels import gmm, reference, tgmm, work_items

M, K, N, E = 37, 20, 13, 6
TILING = (8, 8, 8)
SHAPE = (M, K, N, E)
SIZES = gmm_checks.group_sizes(M, E, [0, 0, 1, 3, 7, 8, 9])
_kernel = jax.jit(functools.partial(gmm_checks.value_and_grads, functools.partial(gmm, tiling=TILING, interpret=True)))


@given(SIZES, st.integers(0, 2**16))
def test_gmm_float32_matches_reference_values_and_gradients(sizes, seed):
    gmm_checks.check_gmm(_kernel, SHAPE, sizes, seed, jnp.float32, dict(rtol=1e-5, atol=1e-5))


@settings(max_examples=8)
@given(SIZES, st.integers(0, 2**16))
def test_gmm_bfloat16_is_close_to_reference(sizes, seed):
    # Both sides accumulate in float32 but round inputs/outputs to bfloat16; K=20 keeps the error small.
    gmm_checks.check_gmm(_kernel, SHAPE, sizes, seed, jnp.bfloat16, dict(rtol=5e-2, atol=1e-1))


_tgmm_kernel = jax.jit(functools.partial(tgmm, tiling=TILING, interpret=True))


@given(SIZES, st.integers(0, 2**16))
def test_tgmm_matches_reference(sizes, seed):
    gmm_checks.check_tgmm(_tgmm_kernel, SHAPE, sizes, seed)


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
