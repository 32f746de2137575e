"""Accelerator code paths lower for TPU and GPU on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` runs Pallas' Mosaic lowering (the kernel body to the
Mosaic MLIR dialects, with their verifier) and embeds each kernel as a ``tpu_custom_call``; nothing is compiled by
the TPU compiler or run. This catches what interpret mode cannot: block shapes Mosaic refuses, primitives without a
Mosaic lowering, scalar-prefetch and DMA misuse. Forward and backward (through the custom VJPs) are lowered.
The same for the expert-parallel dropless layer with the native ``ragged_all_to_all`` (XLA:CPU cannot run it, so
the CPU tests use the emulation): forward and backward lower for TPU and CUDA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import kernels
from moejax.dispatch import get_gmm
from moejax.parallel import expert_parallel
from moejax.parallel.mesh import MeshConfig, make_mesh
from moejax.routing import finish_token_choice

S = jax.ShapeDtypeStruct


KERNEL_CALL = {"tpu": "stablehlo.custom_call @tpu_custom_call",           # a Mosaic kernel
               "cuda": "stablehlo.custom_call @__gpu$xla.gpu.triton"}     # a Triton kernel


def lowered_kernels(fn, *args, platform: str = "tpu") -> int:
    """How many Pallas kernels the lowering of ``fn(*args)`` for ``platform`` holds."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return text.count(KERNEL_CALL[platform])



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_and_its_vjp_lower_for_tpu(dtype):
    lhs, rhs, gs = S((384, 256), dtype), S((4, 256, 384), dtype), S((4,), jnp.int32)

    def fwd_bwd(lhs, rhs, gs):
        loss = lambda a, b: jnp.sum(kernels.gmm(a, b, gs).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)

    assert lowered_kernels(lambda a, b, g: kernels.gmm(a, b, g), lhs, rhs, gs) == 1
    # Backward: the forward gmm, gmm of the cotangent by rhs^T (d lhs) and tgmm (d rhs).
    assert lowered_kernels(fwd_bwd, lhs, rhs, gs) == 3
    assert lowered_kernels(lambda a, g, s: kernels.tgmm(a, g, s), lhs, S((384, 384), dtype), gs) == 1


# (platform, dispatch, combine, (T, K, S, D)). The Triton shapes are ragged against its 64-row and 128-column tiles.
CAPACITY_KERNELS = {
    "mosaic": ("tpu", kernels.capacity_dispatch, kernels.capacity_combine, (64, 2, 8 * 16, 256)),
    "triton": ("cuda", kernels.capacity_dispatch_triton, kernels.capacity_combine_triton, (100, 2, 8 * 27, 200)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("family", sorted(CAPACITY_KERNELS))
def test_capacity_kernels_and_their_vjps_lower(family, dtype, request):
    platform, dispatch, combine, (t, k, slots, d) = CAPACITY_KERNELS[family]
    # The Triton modules are also run through the MLIR verifier as they are built (tests/conftest.py).
    triton_modules = request.getfixturevalue("triton_modules") if platform == "cuda" else None
    x, plan, w = S((t, d), dtype), S((t, k), jnp.int32), S((t, k), jnp.float32)
    count = functools.partial(lowered_kernels, platform=platform)

    def fwd_bwd(x, plan, w):
        def loss(x, w):
            return jnp.sum(combine(dispatch(x, plan, slots), plan, w).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    assert count(lambda x, p: dispatch(x, p, slots), x, plan) == 1
    assert count(lambda y, p, w: combine(y, p, w), S((slots, d), dtype), plan, w) == 1
    # Forward: dispatch (gather_rows), combine (gather_sum); backward: the rows of d out per slot (gather_rows),
    # the slot rows for d weight (gather_rows), d x (gather_sum).
    assert count(fwd_bwd, x, plan, w) == 5
    if triton_modules is not None:
        assert len(triton_modules) == 7


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_expert_parallel_dropless_with_native_ragged_all_to_all_lowers(platform):
    t, d, f, e, k = 32, 8, 16, 8, 2
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    idx = (jnp.arange(t)[:, None] * 3 + jnp.arange(k)[None, :]) % e
    probs = jnp.full((t, e), 1.0 / e)
    routing = finish_token_choice(jnp.log(probs), probs, idx.astype(jnp.int32), jnp.full((t, k), 0.5),
                                  jnp.ones((t, k), bool))
    routing = jax.tree.map(lambda a: jax.device_put(a, tokens) if a.ndim and a.shape[0] == t else a, routing)
    x = jax.device_put(jnp.ones((t, d)), tokens)
    experts = NamedSharding(mesh, P("expert"))
    params = {"w_in": jax.device_put(jnp.ones((e, d, f)), experts),
              "w_out": jax.device_put(jnp.ones((e, f, d)), experts)}

    def loss(x, params):
        y = expert_parallel.dropless_apply(x, routing, params, mesh, kind="mlp", activation="gelu",
                                           gmm=get_gmm("ragged_dot"), native_ragged=True)
        return jnp.sum(y ** 2)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, params).lower(
            lowering_platforms=(platform,)).as_text()
    # Rows out and back in the forward pass; their transposes (again ragged all-to-alls) in the backward pass.
    assert text.count("stablehlo.custom_call @ragged_all_to_all(") == 4
