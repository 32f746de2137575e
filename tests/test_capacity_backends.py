"""Every capacity dispatch/combine backend against the shared contract (tests/capacity_contract.py), and the
selection of ``dispatch.capacity_impl`` (names, platforms, logging).

The Pallas kernels' slot-table tests are in tests/test_kernel_dispatch.py (Mosaic) and
tests/test_kernel_dispatch_gpu.py (Triton); their lowering for TPU/CUDA in tests/test_kernel_lowering.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from capacity_contract import CapacityContract
from gmm_contract import builtin_backends
from moejax.dispatch import backends, capacity
from moejax.dispatch.backends import CAPACITY, forget_logged, select_capacity


class TestEinsum(CapacityContract):
    NAME = "einsum"


class TestIndex(CapacityContract):
    NAME = "index"


class TestPallasMosaic(CapacityContract):
    NAME = "pallas_mosaic"              # dispatch.capacity_impl='pallas' on TPU and CPU (interpreted)


class TestPallasTriton(CapacityContract):
    NAME = "pallas_triton"              # interpreted on CPU


def test_every_builtin_backend_has_a_contract_subclass():
    assert {cls.NAME for cls in CapacityContract.__subclasses__()} == builtin_backends(backends.capacity)


def test_pallas_resolves_per_platform_and_config_names_stay_valid():
    assert [select_capacity("pallas", p).name for p in ("cpu", "gpu", "tpu")] == \
        ["pallas_mosaic", "pallas_triton", "pallas_mosaic"]
    assert set(capacity.IMPLS) <= set(CAPACITY.names())
    with pytest.raises(ValueError, match=r"^dispatch.capacity_impl='pallas': no backend for platform 'metal'.*'index'"):
        select_capacity("pallas", "metal")
    with pytest.raises(ValueError, match=r"^dispatch.capacity_impl='scatter': .*must be one of \[.*pallas"):
        select_capacity("scatter")


def test_each_selection_is_logged_once(caplog):
    forget_logged()
    plan = capacity.TokenChoicePlan(expert_index=jnp.zeros((2, 1), jnp.int32), position=jnp.zeros((2, 1), jnp.int32),
                                    kept=jnp.ones((2, 1), bool), weight=jnp.ones((2, 1)), capacity=1, num_experts=2)
    with caplog.at_level("INFO", logger="moejax"):
        for _ in range(2):
            capacity.combine(plan, capacity.dispatch(plan, jnp.ones((2, 3)), "index"), "index")
        jax.eval_shape(lambda x: capacity.dispatch(plan, x, "pallas"), jnp.ones((2, 3)))
    lines = [r.getMessage() for r in caplog.records if r.name == "moejax"]
    assert lines == ["moejax: dispatch.capacity_impl=index -> index (XLA) on backend cpu",
                     "moejax: dispatch.capacity_impl=pallas -> pallas_mosaic (Mosaic kernels in the Pallas "
                     "interpreter) on backend cpu"]
