"""Pallas Triton grouped-matmul kernels (kernels/gmm_gpu.py): interpret mode against the pure-jnp references, and
lowering for CUDA on this CPU-only machine (the Triton custom call is produced; nothing is compiled by Triton).

Shapes are fixed (M, K, N not multiples of the 16-wide tiles, several row, K and N tiles) and every checked function
is jitted once per dtype, so hypothesis examples only change the group sizes and reuse the compilations.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gmm_checks
from moejax.kernels import gmm_gpu, gmm_triton, reference, tgmm_triton

M, K, N, E = 37, 20, 19, 5
TILING = (16, 16, 16)                 # the smallest Triton tiles: 3 row tiles, 2 K chunks, 2 N tiles
TRITON_CALL = "__gpu$xla.gpu.triton"
SHAPE = (M, K, N, E)
SIZES = gmm_checks.group_sizes(M, E, [0, 0, 1, 3, 7, 9, 16, 17])
_kernel = jax.jit(functools.partial(gmm_checks.value_and_grads,
                                    functools.partial(gmm_gpu, tiling=TILING, interpret=True)))
_operands = functools.partial(gmm_checks.operands, SHAPE)


@given(SIZES, st.integers(0, 2**16))
def test_gmm_triton_float32_matches_reference_values_and_gradients(sizes, seed):
    gmm_checks.check_gmm(_kernel, SHAPE, sizes, seed, jnp.float32, dict(rtol=1e-5, atol=1e-5))


@settings(max_examples=10)
@given(SIZES, st.integers(0, 2**16))
def test_gmm_triton_bfloat16_is_close_to_reference(sizes, seed):
    # Both sides accumulate in float32 but round inputs/outputs to bfloat16; K=20 keeps the error small.
    gmm_checks.check_gmm(_kernel, SHAPE, sizes, seed, jnp.bfloat16, dict(rtol=5e-2, atol=1e-1))


_tgmm = jax.jit(functools.partial(tgmm_triton, tiling=TILING, interpret=True))


@given(SIZES, st.integers(0, 2**16))
def test_tgmm_triton_matches_reference(sizes, seed):
    gmm_checks.check_tgmm(_tgmm, SHAPE, sizes, seed)


def test_rows_past_all_groups_are_never_read_and_empty_groups_are_exactly_zero():
    # NaN in the unassigned rows would poison any output that read them; the empty groups 0, 2 and 4 must be 0.0.
    lhs, rhs, cot = _operands(1, jnp.float32)
    sizes = [0, 20, 0, 9, 0]
    gs = jnp.asarray(sizes, jnp.int32)
    poisoned_lhs, poisoned_cot = lhs.at[29:].set(jnp.nan), cot.at[29:].set(jnp.nan)
    clean_lhs, clean_cot = lhs.at[29:].set(0.0), cot.at[29:].set(0.0)
    d_rhs = _tgmm(poisoned_lhs, poisoned_cot, gs)
    np.testing.assert_array_equal(np.asarray(d_rhs)[[0, 2, 4]], 0.0)
    np.testing.assert_allclose(d_rhs, reference.tgmm(clean_lhs, clean_cot, gs), rtol=1e-5, atol=1e-5)
    out = jax.jit(functools.partial(gmm_triton, tiling=TILING, interpret=True))(poisoned_lhs, rhs, gs)
    np.testing.assert_allclose(out, reference.gmm(clean_lhs, rhs, gs), rtol=1e-5, atol=1e-5)


def test_other_tilings_and_output_dtype():
    # The default tiles clip to the (power-of-two) dimensions; a bf16 kernel can return float32.
    lhs, rhs, cot = _operands(2, jnp.bfloat16)
    gs = jnp.array([3, 0, 30, 1, 0], jnp.int32)
    out = gmm_triton(lhs, rhs, gs, interpret=True, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32),
                               rtol=1e-5, atol=1e-5)
    wide = tgmm_triton(lhs.astype(jnp.float32), cot.astype(jnp.float32), gs, tiling=(32, 16, 32), interpret=True)
    np.testing.assert_allclose(wide, reference.tgmm(lhs.astype(jnp.float32), cot.astype(jnp.float32), gs),
                               rtol=1e-5, atol=1e-5)


def test_argument_errors_name_the_argument():
    gs = jnp.array([4], jnp.int32)
    with pytest.raises(ValueError, match="^lhs"):
        gmm_triton(jnp.ones((4,)), jnp.ones((1, 3, 2)), gs)
    with pytest.raises(ValueError, match="^rhs.*K=3"):
        gmm_triton(jnp.ones((4, 2)), jnp.ones((1, 3, 2)), gs)
    with pytest.raises(ValueError, match="^group_sizes"):
        gmm_triton(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), gs)
    with pytest.raises(ValueError, match="^group_sizes.*integer"):
        gmm_gpu(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4.0]))
    with pytest.raises(ValueError, match="^tiling"):
        gmm_gpu(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), gs, tiling=(16, 24, 16))
    with pytest.raises(ValueError, match="^tiling"):
        gmm_triton(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), gs, tiling=(8, 16, 16))
    with pytest.raises(ValueError, match="^num_warps"):
        gmm_gpu(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), gs, num_warps=3)
    with pytest.raises(ValueError, match="^precision"):
        gmm_triton(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), gs, precision="nonsense")
    with pytest.raises(ValueError, match="^grad.*M=5"):
        tgmm_triton(jnp.ones((4, 3)), jnp.ones((5, 2)), gs)


def _lowered_for_cuda(f, *args) -> str:
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_forward_backward_and_tgmm_lower_to_triton_for_cuda(dtype, triton_modules):
    # Default tiles and ragged sizes; compiling the Triton IR needs a GPU, which these tests never have.
    lhs = jnp.zeros((300, 200), dtype)
    rhs = jnp.zeros((8, 200, 330), dtype)
    gs = jnp.zeros((8,), jnp.int32)

    def loss(a, b, g):
        return jnp.sum(gmm_gpu(a, b, g).astype(jnp.float32) ** 2)

    text = _lowered_for_cuda(jax.value_and_grad(loss, argnums=(0, 1)), lhs, rhs, gs)
    assert text.count(TRITON_CALL) == 3                   # forward, d lhs (gmm on rhs^T), d rhs (tgmm)
    assert text.count('name = "moejax_gmm_triton"') == 2 and text.count('name = "moejax_tgmm_triton"') == 1
    text = _lowered_for_cuda(tgmm_triton, lhs, jnp.zeros((300, 330), dtype), gs)
    assert text.count(TRITON_CALL) == 1
    assert len(triton_modules) == 4 and all("tt.dot" in module for module in triton_modules)


@pytest.mark.parametrize("precision, tf32", [("highest", False), ("default", True), (None, False)])
def test_float32_dot_precision_reaches_triton(precision, tf32, triton_modules):
    # None follows jax_default_matmul_precision, which tests/conftest.py sets to "highest". IEEE is tt.dot's
    # default input precision, so only TF32 is spelled out in the module.
    lhs, rhs, gs = jnp.zeros((64, 32)), jnp.zeros((2, 32, 64)), jnp.zeros((2,), jnp.int32)
    _lowered_for_cuda(functools.partial(gmm_triton, precision=precision), lhs, rhs, gs)
    _lowered_for_cuda(functools.partial(tgmm_triton, precision=precision), lhs, jnp.zeros((64, 64)), gs)
    assert [module.count("tt.dot ") for module in triton_modules] == [1, 1]
    assert [module.count("inputPrecision = tf32") for module in triton_modules] == [int(tf32)] * 2


def test_dispatch_pallas_picks_the_triton_kernel_on_gpu_and_logs_it(monkeypatch, caplog, triton_modules):
    from moejax.dispatch import gmm as dispatch_gmm
    lhs, rhs, gs = jnp.zeros((40, 24)), jnp.zeros((3, 24, 8)), jnp.array([10, 0, 20], jnp.int32)
    with caplog.at_level("INFO", logger="moejax"):
        dispatch_gmm.get_gmm("pallas_triton")
        assert "dispatch.gmm=pallas_triton -> Triton kernel in the Pallas interpreter on backend cpu" in caplog.text
        monkeypatch.setattr(dispatch_gmm.jax, "default_backend", lambda: "gpu")
        for name in ("pallas", "pallas_triton"):
            text = _lowered_for_cuda(dispatch_gmm.get_gmm(name, tile=48), lhs, rhs, gs)    # tile 48 -> 64 rows
            assert TRITON_CALL in text and "moejax_gmm_triton" in text
            assert f"dispatch.gmm={name} -> Triton kernel on backend gpu" in caplog.text
    assert len(triton_modules) == 2


def test_under_shard_map_the_kernels_lower_for_cuda_and_interpret_mode_is_a_clear_error(triton_modules):
    # Expert parallelism calls the gmm per device: the result must carry the operands' varying mesh axes.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("expert",))
    spec = jax.sharding.PartitionSpec("expert")
    lhs, rhs, gs = jnp.zeros((80, 32)), jnp.zeros((4, 32, 16)), jnp.array([5, 0, 30, 3], jnp.int32)

    def grads(a, b, g):
        return jax.grad(lambda a, b: jnp.sum(gmm_gpu(a, b, g) ** 2), argnums=(0, 1))(a, b)

    per_device = jax.shard_map(grads, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))
    assert _lowered_for_cuda(per_device, lhs, rhs, gs).count(TRITON_CALL) == 3
    interpreted = jax.shard_map(functools.partial(gmm_gpu, interpret=True), mesh=mesh, in_specs=(spec,) * 3,
                                out_specs=spec)
    with pytest.raises(ValueError, match="^interpret.*shard_map"):
        jax.jit(interpreted)(lhs, rhs, gs)
