"""The capacity dispatch/combine contract as one test class, :class:`CapacityContract`, subclassed once per backend
(``tests/test_capacity_backends.py``).

The contract (:mod:`moejax.dispatch.backends.capacity.base`): ``dispatch(plan, x[T, D]) -> [E, C, D]`` puts each kept
copy in its slot (empty slots exactly zero); ``combine(plan, y[E, C, D]) -> [T, D]`` sums each token's kept copies'
outputs times their weights. Values and the gradients of ``x``, ``y`` and the plan's weights match the one-hot
references of ``moejax.kernels.reference`` on the plan's slot table; dropped copies get no weight gradient and fully
dropped tokens no input gradient. Plans: token choice (random, one hot expert, empty experts, everything dropped)
and expert choice (full, partly empty, empty). The kernels' own slot-table tests (tilings, interpreter checks,
argument errors) are in tests/test_kernel_dispatch*.py.

Every check jits its function once per (subclass, kind, dtype); examples change only the plans and the data.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.dispatch import capacity
from moejax.dispatch.backends import select_capacity
from moejax.dispatch.backends.capacity import copy_slots
from moejax.kernels import reference
from moejax.routing import expert_choice_routing, finish_token_choice

T, K, E, C, D = 11, 3, 4, 3, 13          # token choice: C * E = 12 < T * K = 33 slots wanted, D not a tile multiple
TOKEN_CHOICE_KINDS = ["random", "hot", "empty_experts", "all_dropped"]
EXPERT_CHOICE_KINDS = ["full", "partial", "all_dropped"]
NAMES = ("buf", "out", "d_x", "d_y", "d_w")


def token_choice_plan(kind: str, seed: int) -> capacity.TokenChoicePlan:
    """A capacity-C plan of T tokens' K copies (``hot``: all to one expert; ``empty_experts``: only the first and
    last expert; ``all_dropped``: no valid copy), position priority."""
    rng = np.random.default_rng(seed)
    if kind == "hot":
        expert = np.full((T, K), rng.integers(E))
    elif kind == "empty_experts":
        expert = rng.choice([0, E - 1], size=(T, K))
    else:
        expert = rng.integers(0, E, size=(T, K))
    valid = rng.random((T, K)) < (0.0 if kind == "all_dropped" else 0.8)
    weight = jnp.asarray(rng.random((T, K)), jnp.float32)
    probs = jnp.full((T, E), 1.0 / E)
    routing = finish_token_choice(jnp.log(probs), probs, jnp.asarray(expert, jnp.int32), weight, jnp.asarray(valid))
    return capacity.plan_token_choice(routing, C)


def expert_choice_plan(kind: str, seed: int):
    """Expert choice over T tokens, each expert taking C of them; ``partial``: some slots unused; ``all_dropped``:
    none used."""
    rng = np.random.default_rng(seed)
    routing = expert_choice_routing(jnp.asarray(rng.normal(size=(T, E)), jnp.float32), C)
    valid = {"full": np.ones((E, C), bool), "partial": rng.random((E, C)) < 0.6,
             "all_dropped": np.zeros((E, C), bool)}[kind]
    return routing.replace(valid=jnp.asarray(valid))


def operands(plan, seed: int, dtype):
    rng = np.random.default_rng(seed + 1)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    e, c = plan.num_experts, plan.capacity
    return normal(T, D), normal(e, c, D), normal(e, c, D), normal(T, D)


def value_and_grads(pair, plan, x, y, cot_buf, cot_out):
    """``(buf, out, d_x, d_y, d_w)`` of a ``(dispatch, combine)`` pair on ``plan``; ``d_w``: of ``plan.weight``."""
    dispatch, combine = pair
    buf, vjp_d = jax.vjp(lambda a: dispatch(plan, a), x)
    out, vjp_c = jax.vjp(lambda b, w: combine(plan.replace(weight=w), b), y, plan.weight)
    return buf, out, vjp_d(cot_buf)[0], *vjp_c(cot_out)


def _reference_dispatch(plan, x):
    slot, _ = copy_slots(plan)
    return reference.capacity_dispatch(x, slot, plan.num_experts * plan.capacity).reshape(
        plan.num_experts, plan.capacity, -1)


def _reference_combine(plan, y):
    slot, weight = copy_slots(plan)
    return reference.capacity_combine(y.reshape(-1, y.shape[-1]), slot, weight)


oracle = jax.jit(functools.partial(value_and_grads, (_reference_dispatch, _reference_combine)))


def check(kernel: Callable, plan, seed: int, dtype, tol: dict):
    """``kernel`` (a jitted :func:`value_and_grads`) matches the oracle on ``plan``; exact zeros where nothing goes."""
    x, y, cot_buf, cot_out = operands(plan, seed, dtype)
    got = kernel(plan, x, y, cot_buf, cot_out)
    want = oracle(plan, x, y, cot_buf, cot_out)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name, **tol)
    buf, _, d_x, _, d_w = got
    slot, _ = copy_slots(plan)
    kept = np.asarray(slot) < plan.num_experts * plan.capacity                          # [T, K'] copies in a slot
    filled = np.zeros(plan.num_experts * plan.capacity, bool)
    filled[np.asarray(slot)[kept]] = True
    np.testing.assert_array_equal(np.asarray(buf, np.float32).reshape(-1, D)[~filled], 0.0)   # empty slots
    np.testing.assert_array_equal(np.asarray(d_x, np.float32)[~kept.any(1)], 0.0)            # fully dropped tokens
    unused = ~np.asarray(plan.kept if isinstance(plan, capacity.TokenChoicePlan) else plan.valid)
    np.testing.assert_array_equal(np.asarray(d_w)[unused], 0.0)                              # dropped copies
    return got


@functools.lru_cache(maxsize=None)
def _jitted(cls: type, vmapped: bool = False) -> Callable:
    f = functools.partial(value_and_grads, cls.make_pair())
    return jax.jit(jax.vmap(f) if vmapped else f)


class CapacityContract:
    """Subclass as ``Test<Backend>`` and set ``NAME`` (its backend name; :meth:`make_pair` selects it on CPU)."""

    NAME: str
    F32_TOL = dict(rtol=1e-5, atol=1e-5)
    # Dispatch is a copy (exact); combine and d_x sum up to K bfloat16 rows in float32, then round.
    BF16_TOL = dict(rtol=1e-2, atol=1e-2)
    EXAMPLES = 10

    @classmethod
    def make_pair(cls):
        """``(dispatch(plan, x), combine(plan, y))`` under test (default: the backend as selected on CPU)."""
        return select_capacity(cls.NAME, "cpu").bind("cpu")

    @pytest.mark.parametrize("kind", TOKEN_CHOICE_KINDS)
    def test_token_choice_plans(self, kind):
        check(_jitted(type(self)), token_choice_plan(kind, 0), 0, jnp.float32, self.F32_TOL)

    @pytest.mark.parametrize("kind", EXPERT_CHOICE_KINDS)
    def test_expert_choice_plans(self, kind):
        check(_jitted(type(self)), expert_choice_plan(kind, 0), 0, jnp.float32, self.F32_TOL)

    def test_random_plans_float32(self):
        @settings(max_examples=self.EXAMPLES)
        @given(st.sampled_from(TOKEN_CHOICE_KINDS), st.integers(0, 2**16))
        def run(kind, seed):
            check(_jitted(type(self)), token_choice_plan(kind, seed), seed, jnp.float32, self.F32_TOL)

        run()

    @pytest.mark.parametrize("kind", ["random", "hot"])
    def test_bfloat16(self, kind):
        buf, out, d_x, d_y, _ = check(_jitted(type(self)), token_choice_plan(kind, 3), 3, jnp.bfloat16, self.BF16_TOL)
        assert buf.dtype == out.dtype == d_x.dtype == d_y.dtype == jnp.bfloat16

    def test_vmap_over_routing_groups(self):
        # dispatch.groups > 1 vmaps the plan: custom VJPs and kernels must batch.
        plans = [token_choice_plan("random", 5), token_choice_plan("hot", 6)]
        ops = [operands(p, s, jnp.float32) for p, s in zip(plans, (5, 6))]
        plan = jax.tree.map(lambda *a: jnp.stack(a), *plans)
        got = _jitted(type(self), True)(plan, *(jnp.stack(a) for a in zip(*ops)))
        for i, p in enumerate(plans):
            want = oracle(p, *ops[i])
            for name, a, b in zip(NAMES, got, want):
                np.testing.assert_allclose(a[i], b, err_msg=name, **self.F32_TOL)
