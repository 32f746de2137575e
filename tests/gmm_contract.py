"""The grouped matmul contract as one test class, :class:`GmmContract`, subclassed once per backend
(``tests/test_gmm_backends.py``; a new backend adds one subclass).

The contract (:mod:`moejax.dispatch.backends.gmm.base`): ``gmm(lhs[M, K], rhs[E, K, N], group_sizes[E]) -> [M, N]``
with the result in ``lhs``'s dtype; rows past all groups are zero, and so are their input gradients; an empty group's
weight gradient is exactly zero; values and the gradients of both operands match ``moejax.kernels.reference``.

A subclass fixes its shape ``(M, K, N, E)`` (M, K, N not multiples of its tiles) and its function; every check jits
that function once per shape and dtype (cached per class), so hypothesis examples only change the group sizes and
the data and reuse the compilations.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.dispatch.backends import select_gmm
from moejax.kernels import reference

Shape = tuple[int, int, int, int]          # (M, K, N, E)
f32 = functools.partial(np.asarray, dtype=np.float32)


def group_sizes(m: int, e: int, random_sizes: list[int]) -> st.SearchStrategy[list[int]]:
    """Group sizes summing to at most M: random draws from ``random_sizes`` (empty groups, straddled tiles, rows
    past the last group), one hot expert, one expert taking every row, all empty, only the last expert."""

    @st.composite
    def sizes(draw) -> list[int]:
        kind = draw(st.sampled_from(["random", "hot", "all_in_one", "zeros", "last_only"]))
        if kind == "random":
            out = draw(st.lists(st.sampled_from(random_sizes), min_size=e, max_size=e))
            while sum(out) > m:
                out[int(np.argmax(out))] -= 1
            return out
        out = [0] * e
        if kind == "hot":
            out[draw(st.integers(0, e - 1))] = draw(st.integers(1, m))
        elif kind == "all_in_one":
            out[draw(st.integers(0, e - 1))] = m
        elif kind == "last_only":
            out[-1] = draw(st.integers(1, m))
        return out

    return sizes()


def named_sizes(m: int, e: int) -> dict[str, list[int]]:
    """The cases every backend must get right, whatever hypothesis draws (E >= 4)."""
    third = m // 3
    return {
        "all_empty": [0] * e,
        "single_hot_group": [0] * (e // 2) + [m - 5] + [0] * (e - e // 2 - 1),
        "all_rows_in_one_group": [m] + [0] * (e - 1),
        "last_group_only": [0] * (e - 1) + [m],
        "empty_and_straddling": [3, 0, third, third - 1] + [0] * (e - 4),     # rows past the last group stay unassigned
        "every_group_one_row": [1] * e,
    }


def operands(shape: Shape, seed: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """lhs [M, K], rhs [E, K, N] and an output cotangent [M, N], standard normal."""
    m, k, n, e = shape
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(m, k)), dtype), jnp.asarray(rng.normal(size=(e, k, n)), dtype),
            jnp.asarray(rng.normal(size=(m, n)), dtype))


def value_and_grads(f: Callable, lhs: jax.Array, rhs: jax.Array, gs: jax.Array, cot: jax.Array):
    out, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
    return out, vjp(cot)


oracle = jax.jit(functools.partial(value_and_grads, reference.gmm))


def check_gmm(kernel: Callable, shape: Shape, sizes: list[int], seed: int, dtype, tol: dict) -> None:
    """``kernel(lhs, rhs, gs, cot) -> (out, (d_lhs, d_rhs))`` (a jitted :func:`value_and_grads`) matches the
    reference; rows past all groups are exactly zero, and so is the weight gradient of every empty group."""
    m, k, n, e = shape
    lhs, rhs, cot = operands(shape, seed, dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    out, (d_lhs, d_rhs) = kernel(lhs, rhs, gs, cot)
    want, (w_lhs, w_rhs) = oracle(lhs, rhs, gs, cot)
    check_against(out, d_lhs, d_rhs, want, w_lhs, w_rhs, shape, sizes, dtype, tol)


def check_against(out, d_lhs, d_rhs, want, w_lhs, w_rhs, shape: Shape, sizes: list[int], dtype, tol: dict) -> None:
    m, k, n, e = shape
    assert out.dtype == dtype and d_lhs.dtype == dtype and d_rhs.dtype == dtype
    assert out.shape == (m, n) and d_lhs.shape == (m, k) and d_rhs.shape == (e, k, n)
    np.testing.assert_allclose(f32(out), f32(want), **tol)
    np.testing.assert_allclose(f32(d_lhs), f32(w_lhs), **tol)
    np.testing.assert_allclose(f32(d_rhs), f32(w_rhs), **tol)
    total = sum(sizes)
    np.testing.assert_array_equal(f32(out)[total:], 0.0)          # rows past all groups
    np.testing.assert_array_equal(f32(d_lhs)[total:], 0.0)
    for g, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(f32(d_rhs)[g], 0.0)     # empty group: weight gradient exactly zero


def check_tgmm(tgmm: Callable, shape: Shape, sizes: list[int], seed: int) -> None:
    """``tgmm(lhs, grad, gs) -> [E, K, N]`` matches the reference in float32; empty groups are exactly zero."""
    m, k, n, e = shape
    lhs, _, cot = operands(shape, seed, jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out = tgmm(lhs, cot, gs)
    assert out.shape == (e, k, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference.tgmm(lhs, cot, gs), rtol=1e-5, atol=1e-5)
    for g, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(out[g], 0.0)


def builtin_backends(package) -> set[str]:
    """The names of the backends that ``package``'s own modules register (each module's ``BACKEND``)."""
    modules = (importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__))
    return {m.BACKEND.name for m in modules if hasattr(m, "BACKEND")}


@functools.lru_cache(maxsize=None)
def _jitted(cls: type, what: str) -> Callable:
    """One jitted check function per (contract subclass, kind): compiled once per shape and dtype."""
    if what == "kernel":
        return jax.jit(functools.partial(value_and_grads, cls.make_gmm()))
    if what == "vmap":
        return jax.jit(jax.vmap(functools.partial(value_and_grads, cls.make_gmm())))
    if what == "selected":
        return jax.jit(functools.partial(value_and_grads, select_gmm(cls.NAME, "cpu").bind("cpu", cls.SELECTED_TILE)))
    raise ValueError(what)


class GmmContract:
    """Subclass as ``Test<Backend>`` and set ``NAME`` (its ``dispatch.gmm`` name) and :meth:`make_gmm`."""

    NAME: str                            # the dispatch.gmm name selecting this backend on CPU
    SHAPE: Shape = (37, 20, 13, 6)       # M, K, N: not multiples of any tile used here
    RANDOM_SIZES = [0, 0, 1, 3, 7, 8, 9]
    F32_EXAMPLES = 25
    BF16_EXAMPLES = 8
    F32_TOL = dict(rtol=1e-5, atol=1e-5)
    # Both sides accumulate in float32 but round inputs/outputs to bfloat16; K=20 keeps the error small.
    BF16_TOL = dict(rtol=5e-2, atol=1e-1)
    SELECTED_TILE = 4                    # the row tile of the dispatch-selected function in test_selected_by_name

    @classmethod
    def make_gmm(cls) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """The function under test, ``(lhs, rhs, group_sizes) -> out`` (default: the CPU backend at tile 8)."""
        return select_gmm(cls.NAME, "cpu").bind("cpu", 8)

    def _sizes(self):
        m, _, _, e = self.SHAPE
        return group_sizes(m, e, self.RANDOM_SIZES)

    def test_float32_values_and_gradients_match_reference(self):
        @settings(max_examples=self.F32_EXAMPLES)
        @given(self._sizes(), st.integers(0, 2**16))
        def check(sizes, seed):
            check_gmm(_jitted(type(self), "kernel"), self.SHAPE, sizes, seed, jnp.float32, self.F32_TOL)

        check()

    def test_bfloat16_is_close_to_reference(self):
        @settings(max_examples=self.BF16_EXAMPLES)
        @given(self._sizes(), st.integers(0, 2**16))
        def check(sizes, seed):
            check_gmm(_jitted(type(self), "kernel"), self.SHAPE, sizes, seed, jnp.bfloat16, self.BF16_TOL)

        check()

    @pytest.mark.parametrize("case", sorted(named_sizes(37, 6)))
    def test_named_group_sizes(self, case):
        # Empty groups, one hot group, every row in one group, rows past the last group, tiles straddling groups.
        m, _, _, e = self.SHAPE
        check_gmm(_jitted(type(self), "kernel"), self.SHAPE, named_sizes(m, e)[case], 7, jnp.float32, self.F32_TOL)

    def test_vmap_over_routings(self):
        # Routing groups vmap the dispatch: two problems of the same shape with different group sizes.
        m, _, _, e = self.SHAPE
        cases = [named_sizes(m, e)["empty_and_straddling"], named_sizes(m, e)["single_hot_group"]]
        ops = [operands(self.SHAPE, seed, jnp.float32) for seed in (1, 2)]
        lhs, rhs, cot = (jnp.stack(a) for a in zip(*ops))
        gs = jnp.asarray(cases, jnp.int32)
        out, (d_lhs, d_rhs) = _jitted(type(self), "vmap")(lhs, rhs, gs, cot)
        for i, sizes in enumerate(cases):
            want, (w_lhs, w_rhs) = oracle(lhs[i], rhs[i], gs[i], cot[i])
            check_against(out[i], d_lhs[i], d_rhs[i], want, w_lhs, w_rhs, self.SHAPE, sizes, jnp.float32,
                          self.F32_TOL)

    @pytest.mark.parametrize("m, sizes", [(1, [0, 1]), (13, [6, 7]), (13, [9]), (13, [0, 4, 0])])
    def test_selected_by_name(self, m, sizes):
        # What dispatch.gmm=NAME runs on CPU (tile and interpret mode bound by the selection): odd row counts, a
        # tile larger than M, a single expert, rows past the last group.
        shape = (m, 3, 5, len(sizes))
        check_gmm(_jitted(type(self), "selected"), shape, sizes, m, jnp.float32, self.F32_TOL)
