"""The whole expert FFN in bulk's layout (moejax.dispatch.bulk_ffn) against the per-expert reference gmm.

Values and gradients (input rows and every parameter) for MLP and GLU experts with and without biases, over
group sizes with empty experts, one hot expert, every row in one group and rows past all groups, and layouts
from all-overflow (bulk=0) to all-slab. Empty experts must get exactly zero parameter gradients.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import reference
from moejax.dispatch import get_fused_ffn
from moejax.dispatch.bulk_ffn import bulk_ffn, overflow_blocks
from moejax.experts.ffn import Dense, Ragged, ffn, ffn_param_shapes

M, D, F, E = 29, 6, 5, 4


def stacked_params(kind: str, use_bias: bool, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(size=(E, *shape)), jnp.float32)
            for name, (shape, _) in ffn_param_shapes(kind, D, F, use_bias).items()}


@st.composite
def group_sizes(draw) -> list[int]:
    kind = draw(st.sampled_from(["random", "hot", "all_in_one", "zeros"]))
    if kind == "random":
        sizes = draw(st.lists(st.integers(0, 12), min_size=E, max_size=E))
        while sum(sizes) > M:
            sizes[int(np.argmax(sizes))] -= 1
        return sizes
    sizes = [0] * E
    if kind != "zeros":
        sizes[draw(st.integers(0, E - 1))] = M if kind == "all_in_one" else draw(st.integers(1, M))
    return sizes


@functools.partial(jax.jit, static_argnames=("kind", "tile", "bulk", "fused", "slab"))
def loss_and_grads(x, params, gs, cot, *, kind, tile, bulk, fused, slab="auto"):
    def loss(x, params):
        if fused:
            expert = lambda p, rows: ffn(p, rows, Dense(), kind=kind, activation="gelu")  # noqa: E731
            y = bulk_ffn(x, params, gs, expert, tile=tile, bulk=bulk, slab=slab)
        else:    # the oracle; rows past all groups are not the experts' business
            y = ffn(params, x, Ragged(gs, reference.gmm), kind=kind, activation="gelu")
            y = jnp.where((jnp.arange(M) < gs.sum())[:, None], y, 0.0)
        return jnp.sum(y * cot)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, params)


@settings(max_examples=25, deadline=None)
@given(group_sizes(), st.sampled_from([("mlp", True), ("mlp", False), ("glu", True), ("glu", False)]),
       st.sampled_from([(2, None, "auto"), (3, 0, "auto"), ((8, 3), 3, "auto"), ((5, 2, 1), 0, "auto"),
                        (64, None, "auto"), ("auto", None, "auto"), ((4, 2), None, 0.5), ("auto", None, 0.25)]),
       st.integers(0, 2**16))
def test_bulk_ffn_matches_reference_values_and_gradients(sizes, expert, layout, seed):
    (kind, use_bias), (tile, bulk, slab) = expert, layout
    rng = np.random.default_rng(seed)
    x, cot = (jnp.asarray(rng.normal(size=(M, D)), jnp.float32) for _ in range(2))
    params, gs = stacked_params(kind, use_bias, seed), jnp.asarray(sizes, jnp.int32)
    got = loss_and_grads(x, params, gs, cot, kind=kind, tile=tile, bulk=bulk, fused=True, slab=slab)
    want = loss_and_grads(x, params, gs, cot, kind=kind, tile=tile, bulk=bulk, fused=False)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    (_, (dx, d_params)) = got
    np.testing.assert_array_equal(np.asarray(dx)[sum(sizes):], 0.0)            # rows past all groups
    for e, s in enumerate(sizes):
        if s == 0:
            for name, grad in d_params.items():
                np.testing.assert_array_equal(np.asarray(grad)[e], 0.0, err_msg=f"{name} of empty expert {e}")


_overflow_blocks = jax.jit(overflow_blocks, static_argnums=(1, 2, 3))


@given(group_sizes(), st.sampled_from([(0, (4,)), (3, (4,)), (3, (8, 3)), (0, (5, 2, 1)), (7, (16, 4))]))
def test_overflow_blocks_cover_every_overflow_row_once(sizes, layout):
    """Every row past a group's first ``cb`` sits in exactly one block of its own group; only each group's last
    block of the last level is partly gap rows, every earlier level's blocks are full."""
    cb, tiles = layout
    levels = _overflow_blocks(jnp.asarray(sizes, jnp.int32), M, cb, tiles)
    starts = np.cumsum(sizes) - np.asarray(sizes)
    want = sorted(int(s) + r for s, g in zip(starts, sizes) for r in range(cb, g))
    seen, gaps = [], 0
    for tb, lev in zip(tiles, levels):
        src, group = np.asarray(lev.src).reshape(-1, tb), np.asarray(lev.group)
        for b in range(int(lev.count)):
            rows = src[b][src[b] < M]
            assert rows.size and all(starts[group[b]] <= r < starts[group[b]] + sizes[group[b]] for r in rows)
            assert rows.size == tb or tb == tiles[-1]
            gaps += tb - rows.size
            seen += rows.tolist()
        assert (src[int(lev.count):] == M).all()                         # blocks past the count are all gaps
    assert sorted(seen) == want
    assert gaps < tiles[-1] * E


def test_layout_rule_and_auto_layout():
    from moejax.dispatch.bulk_ffn import layout_rule
    assert layout_rule(512) == (0.5, (256, 64)) and layout_rule(256) == (0.5, (128, 32))
    assert layout_rule(128) == (1.0, (64, 16)) and layout_rule(127) == (1.0, (64,)) == layout_rule(0)
    # tile='auto' at r = M / E = 256 is the explicit layout the rule names: half slabs, tiles (128, 32)
    m, e = 1024, 4
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(rng.normal(size=(e, *shape)), jnp.float32)
              for k, (shape, _) in ffn_param_shapes("mlp", D, F, False).items()}
    x = jnp.asarray(rng.normal(size=(m, D)), jnp.float32)
    gs = jnp.array([600, 10, 300, 100], jnp.int32)
    expert = lambda p, rows: ffn(p, rows, Dense(), kind="mlp", activation="gelu")  # noqa: E731
    auto = bulk_ffn(x, params, gs, expert, tile="auto")
    np.testing.assert_array_equal(auto, bulk_ffn(x, params, gs, expert, tile=(128, 32), bulk=128))
    want = ffn(params, x, Ragged(gs, reference.gmm), kind="mlp", activation="gelu")
    np.testing.assert_allclose(auto, want, rtol=1e-4, atol=1e-4)
    for bad, field in (((32, 64), "tile"), (0, "tile")):
        with pytest.raises(ValueError, match=f"^{field}="):
            bulk_ffn(x, params, gs, expert, tile=bad)
    with pytest.raises(ValueError, match="^slab="):
        bulk_ffn(x, params, gs, expert, slab=1.5)


def test_bulk_ffn_bfloat16_rows_with_float32_params():
    rng = np.random.default_rng(0)
    params = stacked_params("glu", False, 1)
    gs = jnp.array([20, 0, 5, 4], jnp.int32)
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.bfloat16)
    expert = lambda p, rows: ffn(p, rows, Dense(), kind="glu", activation="silu")  # noqa: E731
    y = bulk_ffn(x, params, gs, expert, tile=4)
    want = ffn(params, x.astype(jnp.float32), Ragged(gs, reference.gmm), kind="glu", activation="silu")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)


def test_only_bulk_has_a_fused_form_and_ffn_uses_it():
    assert get_fused_ffn("bulk") is not None and get_fused_ffn("padded") is None
    assert get_fused_ffn("reference") is None
    calls = []

    def fused(x, params, gs, expert_fn):
        calls.append(x.shape)
        return jnp.zeros((x.shape[0], D))

    params = stacked_params("mlp", True, 0)
    y = ffn(params, jnp.ones((M, D)), Ragged(jnp.full((E,), 2, jnp.int32), reference.gmm, fused), kind="mlp",
            activation="gelu")
    assert calls == [(M, D)] and y.shape == (M, D)


def test_tile_must_be_a_decreasing_sequence_of_positive_ints():
    params, gs = stacked_params("mlp", False, 0), jnp.full((E,), 2, jnp.int32)
    expert = lambda p, rows: ffn(p, rows, Dense(), kind="mlp", activation="gelu")  # noqa: E731
    for bad in ((4, 8), (), 0, (8, 0)):
        with pytest.raises(ValueError, match=r"^tile="):
            bulk_ffn(jnp.ones((M, D)), params, gs, expert, tile=bad)
