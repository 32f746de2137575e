"""Shared checks of grouped-matmul kernels against ``moejax.kernels.reference`` (Mosaic and Triton families alike).

A test module fixes its shape ``(M, K, N, E)`` (M, K, N not multiples of its tiles) and jits its kernel once per
dtype; hypothesis examples then only change the group sizes and reuse the compilations.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

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
