"""Accelerator code paths lower for TPU and GPU on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` runs Pallas' Mosaic lowering (the kernel body to the
Mosaic MLIR dialects, with their verifier) and embeds each kernel as a ``tpu_custom_call``; nothing is compiled by
the TPU compiler or run. This catches what interpret mode cannot: block shapes Mosaic refuses, primitives without a
Mosaic lowering, scalar-prefetch and DMA misuse. Forward and backward (through the custom VJPs) are lowered.
Lowering for ``cuda`` embeds each Triton kernel as a ``__gpu$xla.gpu.triton`` custom call (under an abstract H100:
:func:`cuda_target`), and the
``triton_modules`` fixture (tests/conftest.py) runs every Triton module through the MLIR verifier; nothing is
compiled by Triton. The same for the expert-parallel dropless layer with the native ``ragged_all_to_all`` (XLA:CPU
cannot run it, so the CPU tests use the emulation): forward and backward lower for TPU and CUDA.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.experts import ExpertFFN
from moejax import kernels
from moejax.dispatch import get_gmm
from moejax.dispatch.backends import forget_logged
from moejax.parallel import expert_parallel
from moejax.parallel.mesh import MeshConfig, make_mesh
from moejax.routing import finish_token_choice

S = jax.ShapeDtypeStruct


KERNEL_CALL = {"tpu": "stablehlo.custom_call @tpu_custom_call",           # a Mosaic kernel
               "cuda": "stablehlo.custom_call @__gpu$xla.gpu.triton"}     # a Triton kernel


# The GPU that Pallas' Triton lowering reads its compute capability from when the host has none. jax 0.10 fell back
# to 9.0 on its own; jax 0.12 refuses ("No supported GPU devices found, please specify an abstract GPU device").
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


@contextlib.contextmanager
def cuda_target():
    """Lowering inside this context targets an (abstract) H100, sm_90, whatever the host's devices are."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        yield


def lower_text(fn, *args, platform: str) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for ``platform`` on this host (nothing is compiled)."""
    with cuda_target() if platform == "cuda" else contextlib.nullcontext():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def lowered_kernels(fn, *args, platform: str = "tpu") -> int:
    """How many Pallas kernels the lowering of ``fn(*args)`` for ``platform`` holds."""
    return lower_text(fn, *args, platform=platform).count(KERNEL_CALL[platform])


def _lowered_for_cuda(f, *args) -> str:
    return lower_text(f, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args], platform="cuda")


# ---------------------------------------------------------------- grouped matmul: Mosaic for TPU, Triton for CUDA


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_gmm_forward_backward_and_tgmm_lower_for_cuda(dtype, triton_modules):
    # Default tiles and ragged sizes; compiling the Triton IR needs a GPU, which these tests never have.
    lhs = jnp.zeros((300, 200), dtype)
    rhs = jnp.zeros((8, 200, 330), dtype)
    gs = jnp.zeros((8,), jnp.int32)

    def loss(a, b, g):
        return jnp.sum(kernels.gmm_gpu(a, b, g).astype(jnp.float32) ** 2)

    text = _lowered_for_cuda(jax.value_and_grad(loss, argnums=(0, 1)), lhs, rhs, gs)
    assert text.count(KERNEL_CALL["cuda"]) == 3           # forward, d lhs (gmm on rhs^T), d rhs (tgmm)
    assert text.count('name = "moejax_gmm_triton"') == 2 and text.count('name = "moejax_tgmm_triton"') == 1
    text = _lowered_for_cuda(kernels.tgmm_triton, lhs, jnp.zeros((300, 330), dtype), gs)
    assert text.count(KERNEL_CALL["cuda"]) == 1
    assert len(triton_modules) == 4 and all("tt.dot" in module for module in triton_modules)


@pytest.mark.parametrize("precision, tf32", [("highest", False), ("default", True), (None, False)])
def test_float32_dot_precision_reaches_triton(precision, tf32, triton_modules):
    # None follows jax_default_matmul_precision, which tests/conftest.py sets to "highest". IEEE is tt.dot's
    # default input precision, so only TF32 is spelled out in the module.
    lhs, rhs, gs = jnp.zeros((64, 32)), jnp.zeros((2, 32, 64)), jnp.zeros((2,), jnp.int32)
    _lowered_for_cuda(functools.partial(kernels.gmm_triton, precision=precision), lhs, rhs, gs)
    _lowered_for_cuda(functools.partial(kernels.tgmm_triton, precision=precision), lhs, jnp.zeros((64, 64)), gs)
    assert [module.count("tt.dot ") for module in triton_modules] == [1, 1]
    assert [module.count("inputPrecision = tf32") for module in triton_modules] == [int(tf32)] * 2


def test_dispatch_gmm_pallas_selects_the_triton_kernel_on_gpu_and_logs_it(monkeypatch, caplog, triton_modules):
    lhs, rhs, gs = jnp.zeros((40, 24)), jnp.zeros((3, 24, 8)), jnp.array([10, 0, 20], jnp.int32)
    forget_logged()
    with caplog.at_level("INFO", logger="moejax"):
        get_gmm("pallas_triton")
        assert "dispatch.gmm=pallas_triton -> pallas_triton (Triton kernel in the Pallas interpreter) on backend cpu" \
            in caplog.text
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        for name in ("pallas", "pallas_triton"):
            text = _lowered_for_cuda(get_gmm(name, tile=48), lhs, rhs, gs)    # tile 48 -> 64 rows
            assert KERNEL_CALL["cuda"] in text and "moejax_gmm_triton" in text
            assert f"dispatch.gmm={name} -> pallas_triton (Triton kernel) on backend gpu" in caplog.text
    assert len(triton_modules) == 2


def test_dispatch_gmm_pallas_selects_the_mosaic_kernel_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    lhs, rhs, gs = S((40, 24), jnp.float32), S((3, 24, 8), jnp.float32), S((3,), jnp.int32)
    assert lowered_kernels(get_gmm("pallas", tile=16), lhs, rhs, gs) == 1


def test_under_shard_map_the_triton_gmm_lowers_for_cuda_and_interpret_mode_is_a_clear_error(triton_modules):
    # Expert parallelism calls the gmm per device: the result must carry the operands' varying mesh axes.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("expert",))
    spec = jax.sharding.PartitionSpec("expert")
    lhs, rhs, gs = jnp.zeros((80, 32)), jnp.zeros((4, 32, 16)), jnp.array([5, 0, 30, 3], jnp.int32)

    def grads(a, b, g):
        return jax.grad(lambda a, b: jnp.sum(kernels.gmm_gpu(a, b, g) ** 2), argnums=(0, 1))(a, b)

    # Lowered for CUDA over two abstract H100s (the shard_map's mesh decides the device Triton targets).
    gpus = jax.sharding.AbstractMesh((2,), ("expert",), abstract_device=H100)
    per_device = jax.shard_map(grads, mesh=gpus, in_specs=(spec,) * 3, out_specs=(spec, spec))
    sharded = [S(a.shape, a.dtype, sharding=NamedSharding(gpus, spec)) for a in (lhs, rhs, gs)]
    assert lower_text(per_device, *sharded, platform="cuda").count(KERNEL_CALL["cuda"]) == 3
    interpreted = jax.shard_map(functools.partial(kernels.gmm_gpu, interpret=True), mesh=mesh, in_specs=(spec,) * 3,
                                out_specs=spec)
    with pytest.raises(ValueError, match="^interpret.*shard_map"):
        jax.jit(interpreted)(lhs, rhs, gs)


# ---------------------------------------------------------------- capacity dispatch/combine


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


# ---------------------------------------------------------------- expert parallelism


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
        y = expert_parallel.dropless_apply(x, routing, ExpertFFN(params, "mlp", "gelu"), mesh,
                                           gmm=get_gmm("ragged_dot"), native_ragged=True)
        return jnp.sum(y ** 2)

    with jax.set_mesh(mesh):
        text = lower_text(jax.value_and_grad(loss, argnums=(0, 1)), x, params, platform=platform)
    # Rows out and back in the forward pass; their transposes (again ragged all-to-alls) in the backward pass.
    assert text.count("stablehlo.custom_call @ragged_all_to_all(") == 4
