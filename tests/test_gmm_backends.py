"""Every grouped matmul backend against the shared contract (tests/gmm_contract.py), plus what is particular to each
backend, and the selection (``dispatch.gmm`` names, platforms, fallback, logging, registration).

Lowering the Pallas kernels for TPU/CUDA is in tests/test_kernel_lowering.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gmm_contract
from gmm_contract import GmmContract
from moejax import kernels
from moejax.dispatch import backends, get_fused_ffn, get_gmm, gmm, padded_gmm
from moejax.dispatch.backends import GMM, GmmBackend, forget_logged, register_gmm_backend, select_gmm
from moejax.dispatch.backends.gmm import tokamax as tokamax_backend
from moejax.kernels import reference

needs_tokamax = pytest.mark.skipif(not tokamax_backend.available(),
                                   reason=f"tokamax does not import here ({tokamax_backend.import_error()}); "
                                          f"{tokamax_backend.INSTALL_HINT}")
# What auto picks on TPU here: tokamax when it imports (the measured-elsewhere rule of backends/gmm/tokamax.py). On
# GPU from this CPU host tokamax could only emit its dense XLA fallback, so auto goes on to moejax's Triton kernel.
GPU_TPU_AUTO = "tokamax" if tokamax_backend.available() else "ragged_dot"
GPU_AUTO = "tokamax" if tokamax_backend.available() and tokamax_backend.host_is_gpu() else "pallas_triton"

# ---------------------------------------------------------------- XLA backends


class TestBulk(GmmContract):
    NAME = "bulk"


class TestPadded(GmmContract):
    NAME = "padded"

    @settings(max_examples=25)
    @given(st.lists(st.sampled_from([0, 0, 1, 2, 5, 9, 17]), min_size=4, max_size=4), st.sampled_from([0, 1, 3, 8]),
           st.sampled_from([1, 4]))
    def test_bulk_slabs_and_overflow_match_reference(self, sizes, bulk, tile):
        # The bulk slabs (first `bulk` rows of each group) and the tiled overflow split every group at `bulk`;
        # sizes straddle it (empty groups, groups inside the slab, hot groups far past it).
        m = 70                                        # >= 4 * 17: rows past the last group stay unassigned
        shape = (m, 3, 2, 4)
        gmm_contract.check_gmm(_padded(bulk, tile), shape, sizes, sum(sizes) + bulk, jnp.float32,
                               dict(rtol=1e-5, atol=1e-5))
        lay = _jit_layout(jnp.asarray(sizes, jnp.int32), m, tile, bulk)   # every row in one padded row, counted
        src = np.asarray(lay.src)
        np.testing.assert_array_equal(np.sort(src[src < m]), np.arange(sum(sizes)))
        assert padded_gmm.padded_rows(sizes, tile, bulk) == len(sizes) * bulk + int(lay.num_blocks) * tile


@functools.lru_cache(maxsize=None)
def _padded(bulk, tile):
    fast = functools.partial(padded_gmm.gmm_padded, tile=tile, bulk=bulk)
    return jax.jit(functools.partial(gmm_contract.value_and_grads, fast))


_jit_layout = jax.jit(padded_gmm.layout, static_argnums=(1, 2, 3))


class TestBlocked(GmmContract):
    NAME = "blocked"

    def test_work_is_not_e_times(self):
        # Work items are bounded by ceil(M / tile) + E - 1, whatever the group sizes.
        gs = jnp.array([0, 5, 0, 0, 30, 1, 0, 28], jnp.int32)
        tile_of, group_of, active = gmm._work_items(gs, num_tiles=4, tile=16)
        assert tile_of.shape == (4 + 8 - 1,)
        pairs = {(int(t), int(g)) for t, g, a in zip(tile_of, group_of, active) if a}
        needed = {(r // 16, e) for e, (s, n) in enumerate(zip(np.cumsum(gs) - gs, gs)) for r in range(s, s + n)}
        assert needed <= pairs

    def test_bfloat16_accumulates_in_float32(self):
        lhs = jnp.ones((64, 256), jnp.bfloat16) * 0.01
        rhs = jnp.ones((2, 256, 4), jnp.bfloat16)
        out = gmm.gmm_blocked(lhs, rhs, jnp.array([32, 32], jnp.int32), tile=16)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), 2.56, rtol=1e-2)

    def test_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match="K=3"):
            gmm.gmm_blocked(jnp.ones((4, 2)), jnp.ones((1, 3, 2)), jnp.array([4]))


class TestRaggedDot(GmmContract):
    NAME = "ragged_dot"


class TestReference(GmmContract):
    NAME = "reference"


# ---------------------------------------------------------------- Pallas Mosaic (TPU grid spec), interpret mode


class TestPallasMosaic(GmmContract):
    NAME = "pallas_mosaic"
    TILING = (8, 8, 8)                    # several row, K and N tiles of the odd shape

    @classmethod
    def make_gmm(cls):
        return functools.partial(kernels.gmm, tiling=cls.TILING, interpret=True)

    def test_tgmm_matches_reference(self):
        tgmm = _tgmm_mosaic(self.TILING)

        @given(self._sizes(), st.integers(0, 2**16))
        def check(sizes, seed):
            gmm_contract.check_tgmm(tgmm, self.SHAPE, sizes, seed)

        check()

    def test_default_tiling_on_small_odd_shapes(self):
        # One tile larger than every dimension: the padding path, a single work item per group.
        rng = np.random.default_rng(0)
        lhs = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
        rhs = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
        gs = jnp.array([2, 2], jnp.int32)
        out = kernels.gmm(lhs, rhs, gs, interpret=True, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[4], 0.0)

    def test_work_items_cover_every_group_row_within_the_static_bound(self):
        gs = jnp.array([0, 5, 0, 0, 30, 1, 0, 28], jnp.int32)
        items = kernels.work_items(gs, num_tiles=4, tm=16)
        assert items.tile.shape == (4 + 8 - 1,)
        covered = np.zeros(64, int)
        for t, g, lo, hi in zip(items.tile, items.group, items.lo, items.hi):
            assert t * 16 <= lo <= hi <= t * 16 + 16 or lo == hi
            covered[int(lo):int(hi)] += 1
        np.testing.assert_array_equal(covered, (np.arange(64) < int(gs.sum())).astype(int))   # each row once
        # Items are in row order, so an output block is never revisited after another one.
        assert np.all(np.diff(np.asarray(items.tile)) >= 0) and np.all(np.diff(np.asarray(items.group)) >= 0)

    def test_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match="K=3"):
            kernels.gmm(jnp.ones((4, 2)), jnp.ones((1, 3, 2)), jnp.array([4]), interpret=True)
        with pytest.raises(ValueError, match="group_sizes"):
            kernels.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.array([4]), interpret=True)
        with pytest.raises(ValueError, match="M=5"):
            kernels.tgmm(jnp.ones((4, 3)), jnp.ones((5, 2)), jnp.array([4]), interpret=True)
        with pytest.raises(ValueError, match="tiling"):
            kernels.gmm(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4]), tiling=(8, 0, 8), interpret=True)


@functools.lru_cache(maxsize=None)
def _tgmm_mosaic(tiling):
    return jax.jit(functools.partial(kernels.tgmm, tiling=tiling, interpret=True))


# ---------------------------------------------------------------- Pallas Triton (GPU), interpret mode


class TestPallasTriton(GmmContract):
    NAME = "pallas_triton"
    SHAPE = (37, 20, 19, 5)
    TILING = (16, 16, 16)                 # the smallest Triton tiles: 3 row tiles, 2 K chunks, 2 N tiles
    RANDOM_SIZES = [0, 0, 1, 3, 7, 9, 16, 17]
    BF16_EXAMPLES = 10

    @classmethod
    def make_gmm(cls):
        return functools.partial(kernels.gmm_gpu, tiling=cls.TILING, interpret=True)

    def test_tgmm_matches_reference(self):
        tgmm = _tgmm_triton(self.TILING)

        @given(self._sizes(), st.integers(0, 2**16))
        def check(sizes, seed):
            gmm_contract.check_tgmm(tgmm, self.SHAPE, sizes, seed)

        check()

    def test_rows_past_all_groups_are_never_read_and_empty_groups_are_exactly_zero(self):
        # NaN in the unassigned rows would poison any output that read them; the empty groups 0, 2 and 4 must be 0.
        lhs, rhs, cot = gmm_contract.operands(self.SHAPE, 1, jnp.float32)
        gs = jnp.asarray([0, 20, 0, 9, 0], jnp.int32)
        poisoned_lhs, poisoned_cot = lhs.at[29:].set(jnp.nan), cot.at[29:].set(jnp.nan)
        clean_lhs, clean_cot = lhs.at[29:].set(0.0), cot.at[29:].set(0.0)
        d_rhs = _tgmm_triton(self.TILING)(poisoned_lhs, poisoned_cot, gs)
        np.testing.assert_array_equal(np.asarray(d_rhs)[[0, 2, 4]], 0.0)
        np.testing.assert_allclose(d_rhs, reference.tgmm(clean_lhs, clean_cot, gs), rtol=1e-5, atol=1e-5)
        out = jax.jit(functools.partial(kernels.gmm_triton, tiling=self.TILING, interpret=True))(poisoned_lhs, rhs, gs)
        np.testing.assert_allclose(out, reference.gmm(clean_lhs, rhs, gs), rtol=1e-5, atol=1e-5)

    def test_other_tilings_and_output_dtype(self):
        # The default tiles clip to the (power-of-two) dimensions; a bf16 kernel can return float32.
        lhs, rhs, cot = gmm_contract.operands(self.SHAPE, 2, jnp.bfloat16)
        gs = jnp.array([3, 0, 30, 1, 0], jnp.int32)
        out = kernels.gmm_triton(lhs, rhs, gs, interpret=True, preferred_element_type=jnp.float32)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32),
                                   rtol=1e-5, atol=1e-5)
        lhs32, cot32 = lhs.astype(jnp.float32), cot.astype(jnp.float32)
        wide = kernels.tgmm_triton(lhs32, cot32, gs, tiling=(32, 16, 32), interpret=True)
        np.testing.assert_allclose(wide, reference.tgmm(lhs32, cot32, gs), rtol=1e-5, atol=1e-5)

    def test_argument_errors_name_the_argument(self):
        gs = jnp.array([4], jnp.int32)
        gmm_triton, gmm_gpu, tgmm_triton = kernels.gmm_triton, kernels.gmm_gpu, kernels.tgmm_triton
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


@functools.lru_cache(maxsize=None)
def _tgmm_triton(tiling):
    return jax.jit(functools.partial(kernels.tgmm_triton, tiling=tiling, interpret=True))


# ---------------------------------------------------------------- tokamax (optional package)


@needs_tokamax
class TestTokamax(GmmContract):
    """tokamax.ragged_dot on CPU: its XLA implementation (its Pallas kernels refuse CPU devices)."""

    NAME = "tokamax"

    def test_rows_past_all_groups_are_zero_even_when_the_kernel_leaves_garbage(self):
        # tokamax's Mosaic TPU kernel never writes the rows past the last group (NaN in the TPU interpreter, below);
        # a stand-in kernel that writes NaN there, in its value and in its lhs gradient, must not leak through.
        lhs, rhs, cot = gmm_contract.operands(self.SHAPE, 3, jnp.float32)
        gs = jnp.asarray([3, 0, 12, 9, 0, 0], jnp.int32)
        fn = jax.jit(functools.partial(gmm_contract.value_and_grads,
                                       functools.partial(tokamax_backend.gmm_tokamax, implementation=(_garbage_tail,))))
        out, (d_lhs, d_rhs) = fn(lhs, rhs, gs, cot)
        want, (w_lhs, w_rhs) = gmm_contract.oracle(lhs, rhs, gs, cot)
        gmm_contract.check_against(out, d_lhs, d_rhs, want, w_lhs, w_rhs, self.SHAPE, [3, 0, 12, 9, 0, 0],
                                   jnp.float32, self.F32_TOL)

    @pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")     # tokamax types `interpret` as bool
    def test_mosaic_tpu_kernel_forward_in_tpu_interpret_mode(self, monkeypatch):
        # tokamax's Mosaic TPU kernel (the one MaxText runs) traced for an abstract TPU v5e and run in JAX's TPU
        # interpret mode, through gmm_tokamax as on a TPU (rows padded to 128, rows past the groups zeroed). Forward
        # only: its optimize_remat VJP cannot differentiate the interpreter's callbacks. K and N are tile multiples
        # because the interpreter refuses the partial edge blocks a TPU clips.
        op, mesh = _tpu_interpreted_mosaic()
        monkeypatch.setattr(tokamax_backend, "current_platform", lambda platform=None: "tpu")
        shape = (200, 256, 128, 4)                                   # M=200: padded to 256
        fwd = jax.jit(functools.partial(tokamax_backend.gmm_tokamax, implementation=op))
        for sizes in ([60, 0, 70, 5], [0, 0, 0, 200], [1, 127, 2, 0]):
            lhs, rhs, _ = gmm_contract.operands(shape, sum(sizes), jnp.float32)
            gs = jnp.asarray(sizes, jnp.int32)
            with jax.sharding.use_abstract_mesh(mesh):
                # Traced for the abstract TPU, lowered and compiled for this host (jax 0.12 no longer infers the
                # platform when the context mesh is abstract).
                lowered = fwd.trace(lhs, rhs, gs).lower(lowering_platforms=("cpu",))
                out = lowered.compile(device_assignment=(jax.devices("cpu")[0],))(lhs, rhs, gs)
            np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)


@needs_tokamax
def test_tokamax_is_not_offered_for_a_gpu_program_compiled_on_a_host_without_a_gpu(monkeypatch):
    # Its GPU kernels refuse a CPU host ("Not supported on cpu") even when compiling for an H100, leaving only its
    # XLA fallback: a dense product over all experts, what auto must never end on for a GPU.
    monkeypatch.setattr(tokamax_backend, "host_is_gpu", lambda: False)
    assert gmm.resolve_name("auto", "gpu") == "pallas_triton" and gmm.resolve_name("auto", "tpu") == "tokamax"
    with pytest.raises(ValueError, match=r"^dispatch.gmm='tokamax': runs only on tpu, or gpu from a host whose jax "
                                         r"backend is a GPU .*not on platform 'gpu'"):
        select_gmm("tokamax", "gpu")
    monkeypatch.setattr(tokamax_backend, "host_is_gpu", lambda: True)
    assert gmm.resolve_name("auto", "gpu") == "tokamax"


def test_without_tokamax_auto_passes_over_it_and_naming_it_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tokamax_backend, "import_error", lambda: "ModuleNotFoundError: No module named 'tokamax'")
    assert [gmm.resolve_name("auto", p) for p in ("cpu", "gpu", "tpu")] == ["bulk", "pallas_triton", "ragged_dot"]
    with pytest.raises(ValueError, match=r"^dispatch.gmm='tokamax': runs only on an install with the optional "
                                         r"package tokamax \(pip install -e \"\.\[tokamax\]\"; here "
                                         r"ModuleNotFoundError.*not on platform 'gpu'"):
        select_gmm("tokamax", "gpu")


def _garbage_tail(lhs, rhs, *, group_sizes, ragged_dot_dimension_numbers, precision, preferred_element_type,
                  activation):
    """A tokamax implementation that computes the groups right and leaves NaN in every row past them, in its value
    and in its lhs gradient (what an unwritten output buffer looks like)."""
    del ragged_dot_dimension_numbers, precision, activation
    gs = jnp.asarray(group_sizes)

    @jax.custom_vjp
    def f(a, b):
        out = jax.lax.ragged_dot(a, b, gs, preferred_element_type=jnp.float32).astype(preferred_element_type)
        return jnp.where((jnp.arange(a.shape[0]) < gs.sum())[:, None], out, jnp.nan)

    def fwd(a, b):
        return f(a, b), (a, b)

    def bwd(res, d_out):
        a, b = res
        _, vjp = jax.vjp(lambda x, y: jax.lax.ragged_dot(x, y, gs), a, b)
        d_a, d_b = vjp(d_out)
        return jnp.where((jnp.arange(a.shape[0]) < gs.sum())[:, None], d_a, jnp.nan), d_b

    f.defvjp(fwd, bwd)
    return f(lhs, rhs)


@functools.lru_cache(maxsize=None)
def _tpu_interpreted_mosaic():
    """(tokamax's Mosaic TPU ragged dot in TPU interpret mode, an abstract mesh whose device is a TPU v5e).

    tokamax's own ``interpret=True`` is not enough on CPU: the op refuses non-TPU devices and its pipeline asks the
    device for TPU tiling facts while tracing. Private tokamax and JAX API: skips if either moved.
    """
    try:
        import jax.experimental.pallas.tpu as pltpu
        from jax._src import mesh as mesh_lib
        from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu
    except (ImportError, AttributeError) as err:
        pytest.skip(f"tokamax's Mosaic TPU kernel or JAX's TPU interpret mode moved: {err}")

    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class AnyDevice(pallas_mosaic_tpu.PallasMosaicTpuRaggedDot):
        def supported_on(self, device) -> bool:
            return True

    # "uninitialized": rows past the groups are never written; reading them must not raise (they are masked).
    op = AnyDevice(config=None, interpret=pltpu.InterpretParams(out_of_bounds_reads="uninitialized"))
    device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    return op, jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


# ---------------------------------------------------------------- selection


def test_every_builtin_backend_has_a_contract_subclass():
    tested = {cls.NAME for cls in GmmContract.__subclasses__()}
    assert tested == gmm_contract.builtin_backends(backends.gmm) and tested <= set(GMM.backends)


def test_auto_and_pallas_resolve_per_platform_in_fallback_order():
    assert [gmm.resolve_name("auto", p) for p in ("cpu", "gpu", "tpu", "metal")] == \
        ["bulk", GPU_AUTO, GPU_TPU_AUTO, "blocked"]
    assert [gmm.resolve_name("pallas", p) for p in ("cpu", "gpu", "tpu", "cuda")] == \
        ["pallas_mosaic", "pallas_triton", "pallas_mosaic", "pallas_triton"]
    assert select_gmm("pallas", "cpu").interpreted("cpu") and not select_gmm("pallas", "tpu").interpreted("tpu")
    assert {"auto", "pallas", "bulk", "pallas_mosaic", "pallas_triton"} <= set(gmm.available())


def test_unsupported_platform_and_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^dispatch.gmm='pallas_triton': runs only on GPU .*not on platform 'tpu'"):
        select_gmm("pallas_triton", "tpu")
    with pytest.raises(ValueError, match=r"^dispatch.gmm='pallas_mosaic': runs only on TPU .*platform 'gpu'"):
        select_gmm("pallas_mosaic", "gpu")
    with pytest.raises(ValueError, match=r"^dispatch.gmm='pallas': no backend for platform 'metal'"):
        select_gmm("pallas", "metal")
    with pytest.raises(ValueError, match=r"^dispatch.gmm='triton': unknown grouped matmul; must be one of \["):
        get_gmm("triton")


def test_each_selection_is_logged_once_per_name_and_platform(caplog):
    forget_logged()
    with caplog.at_level("INFO", logger="moejax"):
        get_gmm("auto")
        get_gmm("auto", tile=16)
        get_fused_ffn("auto")
        select_gmm("pallas", "cpu")
        select_gmm("pallas", "gpu")
        select_gmm("pallas", "gpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "moejax"]
    assert lines == ["moejax: dispatch.gmm=auto -> bulk (XLA) on backend cpu",
                     "moejax: dispatch.gmm=pallas -> pallas_mosaic (Mosaic kernel in the Pallas interpreter) on "
                     "backend cpu",
                     "moejax: dispatch.gmm=pallas -> pallas_triton (Triton kernel) on backend gpu"]


def test_selection_binds_tile_and_interpret_mode():
    assert get_gmm("bulk", tile=16).keywords == {"tile": 16}
    assert get_gmm("pallas_triton", tile=48).keywords == {"tile": 48, "interpret": True}
    assert select_gmm("pallas_triton", "gpu").bind("gpu", 48).keywords == {"tile": 48, "interpret": False}
    assert get_gmm("ragged_dot") is select_gmm("ragged_dot").fn
    assert get_fused_ffn("bulk", tile=16).keywords == {"tile": 16, "slab": "auto"} and get_fused_ffn("padded") is None
    # 'auto' and tile levels: bulk's fused form gets them as given, its unfused gmm one tile (the smallest; 'auto':
    # the default tile); a backend without tile levels refuses a sequence, naming the config field.
    assert get_fused_ffn("bulk", tile=[128, 32], slab=0.5).keywords == {"tile": (128, 32), "slab": 0.5}
    assert get_gmm("bulk", tile=(128, 32)).keywords == {"tile": 32}
    assert get_gmm("bulk", tile="auto").keywords == {"tile": 64} == get_gmm("blocked", tile="auto").keywords
    with pytest.raises(ValueError, match=r"^dispatch.gmm_tile=\(128, 32\): .*not 'padded'"):
        get_gmm("padded", tile=(128, 32))


def test_register_custom_gmm():
    calls = []

    def mine(lhs, rhs, gs):
        calls.append(1)
        return reference.gmm(lhs, rhs, gs)

    gmm.register_gmm("test_mine", mine)
    fn = get_gmm("test_mine")
    fn(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]))
    assert calls and "test_mine" in gmm.available()


def test_a_third_party_backend_declares_its_platforms_and_can_lead_auto(monkeypatch):
    monkeypatch.setattr(GMM, "backends", dict(GMM.backends))
    monkeypatch.setattr(GMM, "aliases", {a: dict(per) for a, per in GMM.aliases.items()})
    register_gmm_backend(GmmBackend("test_library", reference.gmm, platforms=("gpu",), kernel="library kernel"),
                         prefer_for=("gpu", "tpu"))
    assert gmm.resolve_name("auto", "gpu") == "test_library"
    assert gmm.resolve_name("auto", "tpu") == GPU_TPU_AUTO          # not on TPU: the next in the fallback order
    assert gmm.resolve_name("auto", "cpu") == "bulk"
    with pytest.raises(ValueError, match="dispatch.gmm='test_library': runs only on GPU, not on platform 'cpu'"):
        get_gmm("test_library")
    with pytest.raises(ValueError, match="alias"):
        register_gmm_backend(GmmBackend("pallas", reference.gmm))
