"""The Mosaic (TPU) kernels lower for TPU on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` runs Pallas' Mosaic lowering (the kernel body to the
Mosaic MLIR dialects, with their verifier) and embeds each kernel as a ``tpu_custom_call``; nothing is compiled by
the TPU compiler or run. This catches what interpret mode cannot: block shapes Mosaic refuses, primitives without a
Mosaic lowering, scalar-prefetch and DMA misuse. Forward and backward (through the custom VJPs) are lowered.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from moejax import kernels

S = jax.ShapeDtypeStruct


def tpu_kernels(fn, *args) -> int:
    """How many Mosaic kernels the TPU lowering of ``fn(*args)`` holds."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    return text.count("stablehlo.custom_call @tpu_custom_call")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_and_its_vjp_lower_for_tpu(dtype):
    lhs, rhs, gs = S((384, 256), dtype), S((4, 256, 384), dtype), S((4,), jnp.int32)

    def fwd_bwd(lhs, rhs, gs):
        loss = lambda a, b: jnp.sum(kernels.gmm(a, b, gs).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)

    assert tpu_kernels(lambda a, b, g: kernels.gmm(a, b, g), lhs, rhs, gs) == 1
    # Backward: the forward gmm, gmm of the cotangent by rhs^T (d lhs) and tgmm (d rhs).
    assert tpu_kernels(fwd_bwd, lhs, rhs, gs) == 3
    assert tpu_kernels(lambda a, g, s: kernels.tgmm(a, g, s), lhs, S((384, 384), dtype), gs) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_capacity_kernels_and_their_vjps_lower_for_tpu(dtype):
    t, k, slots, d = 64, 2, 8 * 16, 256
    x, plan, w = S((t, d), dtype), S((t, k), jnp.int32), S((t, k), jnp.float32)

    def fwd_bwd(x, plan, w):
        def loss(x, w):
            buf = kernels.capacity_dispatch(x, plan, slots)
            return jnp.sum(kernels.capacity_combine(buf, plan, w).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    assert tpu_kernels(lambda x, p: kernels.capacity_dispatch(x, p, slots), x, plan) == 1
    assert tpu_kernels(lambda y, p, w: kernels.capacity_combine(y, p, w), S((slots, d), dtype), plan, w) == 1
    # Forward: dispatch (gather_rows), combine (gather_sum); backward: the rows of d out per slot (gather_rows),
    # the slot rows for d weight (gather_rows), d x (gather_sum).
    assert tpu_kernels(fwd_bwd, x, plan, w) == 5
