"""Compiled for the hardware it targets: moejax's kernels and train steps compiled for TPU (libtpu) and H100 (jax's
CUDA plugin) on this CPU machine, and ``python -m moejax.aot``.

Unlike tests/test_kernel_lowering.py (lowering only), these run the TPU / GPU compilers themselves: Mosaic's and
Triton's own checks, XLA's passes, the optimised HLO. Every Pallas path is checked to contain its compiled kernel
(``tpu_custom_call`` / the Triton call), not only to compile. The TPU tests need libtpu (the test extra installs it
on x86-64 Linux); the GPU tests need jax's CUDA plugin (``pip install -e ".[aot-gpu]"``) and skip without it.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import kernels, libtpu_env
from moejax.aot import analysis, targets
from moejax.dispatch import get_gmm
from moejax.dispatch.backends.registry import current_platform

ROOT = pathlib.Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct
needs_libtpu = pytest.mark.skipif(not libtpu_env.libtpu_installed(),
                                  reason='libtpu is not installed (pip install -e ".[test]" on x86-64 Linux)')


def _cuda_plugin() -> bool:
    try:
        targets.check_compiler("gpu:h100:1")
        return True
    except targets.TargetError:
        return False


needs_cuda_plugin = pytest.mark.skipif(not _cuda_plugin(), reason='jax\'s CUDA plugin is not installed (pip install '
                                       '-e ".[aot-gpu]"); docs/accelerator.md has the command that runs these')

TPUS = ["tpu:v4:2x2x1", "tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v6e:2x2"]


@functools.cache
def target(spec: str) -> targets.Target:
    return targets.make_target(spec)


def compiled_kernels(spec: str, fn, *shapes) -> int:
    """Compiles ``fn`` for the first device of ``spec`` and counts the compiled Pallas kernel calls in its HLO."""
    t = target(spec)
    mesh = Mesh(np.array(t.devices[:1]), ("x",))
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*[S(s.shape, s.dtype, sharding=replicated) for s in shapes]).compile()
    return analysis.kernel_calls(compiled.as_text(), t.platform)


def gmm_fwd_bwd(gmm):
    def fn(lhs, rhs, gs):
        return jax.value_and_grad(lambda a, b: jnp.sum(gmm(a, b, gs).astype(jnp.float32) ** 2), argnums=(0, 1))(lhs,
                                                                                                               rhs)
    return fn


def capacity_fwd_bwd(dispatch, combine, slots):
    def fn(x, plan, w):
        def loss(x, w):
            return jnp.sum(combine(dispatch(x, plan, slots), plan, w).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    return fn


# ---------------------------------------------------------------- targets and bad input


@pytest.mark.parametrize("spec, message", [
    ("v5e:2x2", "must be tpu:<generation>:<topology> or gpu:<kind>:<count>"),
    ("tpu:v9:2x2", "unknown TPU generation 'v9'"),
    ("tpu:v5e:2by2", "topology '2by2' must be chips per dimension"),
    ("gpu:a100:8", "no shipped target config for GPU kind 'a100'"),
    ("gpu:h100:0", "GPU count '0' must be an integer >= 1"),
    ("cpu:x:1", "unknown platform 'cpu'"),
])
def test_a_bad_target_is_one_line_naming_the_flag(spec, message):
    with pytest.raises(targets.TargetError, match=r"^--target=.*" + message.replace("(", r"\(").replace(")", r"\)")):
        targets.parse(spec)


@needs_libtpu
def test_tpu_targets_say_their_device_kind_and_memory():
    kinds = {spec: (target(spec).device_kind, target(spec).memory_per_device) for spec in TPUS}
    assert kinds["tpu:v5e:2x2"] == ("TPU v5 lite", 16 << 30)
    assert kinds["tpu:v5p:2x2x1"] == ("TPU v5", 95 << 30)
    assert kinds["tpu:v6e:2x2"] == ("TPU v6 lite", 32 << 30)
    v4 = target("tpu:v4:2x2x1")     # libtpu exposes each v4 TensorCore as a device: half a chip's HBM each
    assert (v4.device_kind, v4.num_devices, v4.devices_per_chip, v4.memory_per_device) == ("TPU v4", 8, 2, 16 << 30)
    with pytest.raises(targets.TargetError, match=r"^--target='tpu:v5e:3x3': libtpu cannot make topology"):
        targets.make_target("tpu:v5e:3x3")


@pytest.mark.skipif(_cuda_plugin(), reason="the CUDA plugin is installed here")
def test_without_the_cuda_plugin_a_gpu_target_says_how_to_install_it():
    with pytest.raises(targets.TargetError, match=r"^--target='gpu:h100:8': needs jax's CUDA plugin.*aot-gpu"):
        targets.check_compiler("gpu:h100:8")


def test_collectives_are_read_off_optimised_hlo_with_their_bytes():
    hlo = "\n".join([
        "  %ag = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p), dimensions={0}",
        "  %ars = (f32[64]{0}, f32[64]{0}) all-reduce-start(f32[64]{0} %x), to_apply=%add",
        "  %ard = f32[64]{0} all-reduce-done((f32[64]{0}, f32[64]{0}) %ars)",
        "  %r = f32[16,4]{1,0} ragged-all-to-all(f32[16,4]{1,0} %a, f32[16,4]{1,0} %b, s32[2] %c), replica_groups={}",
        '  %k = f32[8]{0} custom-call(f32[8]{0} %z), custom_call_target="tpu_custom_call"',
    ])
    got = analysis.collectives(hlo)
    assert got["all-gather"] == {"count": 1, "bytes": 8 * 128 * 2}
    assert got["all-reduce"] == {"count": 1, "bytes": 64 * 4}         # the async pair counts once
    assert got["ragged-all-to-all"] == {"count": 1, "bytes": 16 * 4 * 4}
    assert got["all-to-all"]["count"] == 0
    assert analysis.kernel_calls(hlo, "tpu") == 1 and analysis.kernel_calls(hlo, "gpu") == 0


# ---------------------------------------------------------------- every Pallas kernel, compiled for TPU


@needs_libtpu
@pytest.mark.parametrize("spec", TPUS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mosaic_kernels_and_both_gradients_compile_for_tpu(spec, dtype):
    lhs, rhs, gs = S((384, 256), dtype), S((4, 256, 384), dtype), S((4,), jnp.int32)
    # Forward gmm; backward: gmm of the cotangent by rhs^T (d lhs) and tgmm (d rhs).
    assert compiled_kernels(spec, gmm_fwd_bwd(kernels.gmm), lhs, rhs, gs) == 3
    x, plan, w = S((64, 256), dtype), S((64, 2), jnp.int32), S((64, 2), jnp.float32)
    # Forward dispatch (gather_rows) and combine (gather_sum); backward: two gather_rows and one gather_sum. The
    # 16-bit rows go through float32 copies (kernels/capacity_pallas_mosaic.py, _dma_rows): Mosaic refused them.
    fwd_bwd = capacity_fwd_bwd(kernels.capacity_dispatch, kernels.capacity_combine, 128)
    assert compiled_kernels(spec, fwd_bwd, x, plan, w) == 5


@needs_libtpu
@pytest.mark.parametrize("spec", ["tpu:v5e:2x2", "tpu:v5p:2x2x1"])
def test_dispatch_selects_compiled_tpu_kernels_for_a_tpu_mesh_from_this_cpu_host(spec):
    # The platform is the mesh's (the program's), not jax.default_backend() (cpu here): the kernels are compiled,
    # not run in the Pallas interpreter, and tokamax's TPU path (auto's first choice) is its Mosaic kernel.
    t = target(spec)
    lhs, rhs, gs = S((512, 256), jnp.bfloat16), S((8, 256, 256), jnp.bfloat16), S((8,), jnp.int32)
    with jax.set_mesh(Mesh(np.array(t.devices[:1]), ("x",))):
        assert current_platform() == "tpu"
        pallas, auto = get_gmm("pallas"), get_gmm("tokamax")
    assert current_platform() == "cpu"
    assert compiled_kernels(spec, gmm_fwd_bwd(pallas), lhs, rhs, gs) == 3
    assert compiled_kernels(spec, gmm_fwd_bwd(auto), lhs, rhs, gs) >= 3


@pytest.fixture(scope="module")
def lm_tiny():
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import lm_tiny
        return lm_tiny.get_config
    finally:
        sys.path.pop(0)


@needs_libtpu
@pytest.mark.parametrize("gmm", ["pallas_mosaic", "auto"])
def test_expert_parallel_train_step_compiles_for_a_tpu_topology_with_the_native_ragged_all_to_all(lm_tiny, gmm):
    # CPU tests can only run the emulated ragged all-to-all; here the real one is compiled, with the kernels'
    # custom VJPs under shard_map (their cotangents vary over the expert axis: the output buffers must too).
    from moejax.aot.compile import compile_train
    config = lm_tiny()
    config.mesh.data, config.mesh.expert = 1, 4
    config.model.num_layers = 1          # one MoE layer: the compile is what is tested (suite time)
    config.model.moe.dispatch.gmm = gmm
    program, backends, facts = compile_train(config, target("tpu:v5e:2x2"))
    assert facts["mesh"]["expert"] == 4
    assert program.collectives["ragged-all-to-all"]["count"] >= 4        # out and back, forward and backward
    assert program.collectives["ragged-all-to-all"]["bytes"] > 0
    assert all(not interpreted for _, _, _, interpreted in backends.layers)
    assert {name for _, _, name, _ in backends.layers} == {"pallas_mosaic" if gmm == "pallas_mosaic" else "tokamax"}
    assert program.kernel_calls >= 3 * 2              # three expert matmuls, forward and backward
    assert 0 < program.state_bytes <= program.memory.arguments <= program.memory.total


@needs_libtpu
def test_expert_and_data_parallel_train_step_sums_the_kernels_weight_gradients_over_data(lm_tiny):
    # Experts over 2, tokens over 2 x 2: the expert weights are replicated over data inside shard_map, so the custom
    # VJP's weight gradient must be summed over data (it was returned varying and the step did not compile).
    from moejax.aot.compile import compile_train
    config = lm_tiny()
    config.model.num_layers = 1
    config.model.moe.dispatch.gmm = "pallas_mosaic"
    config.mesh.data, config.mesh.expert = 2, 2
    program, _, _ = compile_train(config, target("tpu:v5e:2x2"))
    assert program.kernel_calls >= 9 and program.collectives["ragged-all-to-all"]["count"] >= 4


@needs_libtpu
@pytest.mark.parametrize("dispatch, kernels", [({"gmm": "pallas_mosaic"}, 9), ({"gmm": "tokamax"}, 7),
                                               ({"mode": "capacity", "capacity_impl": "pallas", "groups": 4}, 5)])
def test_data_parallel_train_step_dispatches_each_devices_own_tokens_with_compiled_kernels(lm_tiny, dispatch, kernels):
    # Tokens split over 4 devices, experts not: each device routes its own tokens (TokenParallel). Before it, XLA
    # gathered every device's routing onto each (4 all-gathers here) and ran the whole batch's grouped matmuls on
    # every device, and moejax's Mosaic kernels, which XLA cannot partition, did not compile at all.
    from moejax.aot.compile import compile_train
    config = lm_tiny()
    config.model.num_layers = 1
    for field, value in dispatch.items():
        setattr(config.model.moe.dispatch, field, value)
    program, backends, facts = compile_train(config, target("tpu:v5e:2x2"))
    assert facts["mesh"]["data"] == 4 and not any(interpreted for *_, interpreted in backends.layers)
    assert program.kernel_calls >= kernels               # tokamax 0.0.17 splits its gradients into more calls
    assert program.collectives["all-gather"]["count"] == 0
    assert program.collectives["all-reduce"]["count"] >= 1                 # the gradients' reduction over data


@needs_libtpu
def test_generation_prefill_and_decode_compile_for_a_tpu_topology_with_experts_split_and_the_cache_donated(lm_tiny):
    # What moejax.generation.generate runs, MoE dropless: prefill into an empty cache, then one-token decode steps.
    from moejax.aot import compile as compile_lib
    from moejax.models import build_model
    config = lm_tiny()
    config.mesh.data, config.mesh.expert = 1, 4
    config.model.num_layers = 1
    t = target("tpu:v5e:2x2")
    layout = compile_lib.Layout.of(config, t)
    model = build_model(config.model, vocab_size=256)
    variables = compile_lib.abstract_variables(model, layout)
    experts = variables["params"]["decoder"]["block_0"]["ffn"]["experts"]
    assert all(leaf.sharding.spec[0] == "expert" for leaf in jax.tree.leaves(experts))
    gen = compile_lib.Generation(batch=8, prompt_len=64, new_tokens=16)
    prefill, decode = compile_lib.compile_generate(model, variables, t, layout, gen)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    cache_bytes = 2 * 8 * 80 * 4 * 16 * 4 // 4 + 8 * 80 // 4 + 4        # k and v [B, S, H, Dh] f32, valid, index
    for program in (prefill, decode):
        assert program.state_bytes == compile_lib._shard_bytes(variables) + cache_bytes
        assert program.memory.aliased >= cache_bytes - 4                    # the cache is updated in place
        assert program.collectives["ragged-all-to-all"]["count"] == 2        # tokens out to their experts and back
        assert program.kernel_calls >= 3                                     # the experts' grouped matmuls
    assert prefill.cost["flops"] > 10 * decode.cost["flops"]
    with pytest.raises(ValueError, match=r"^--gen_batch=6: must be divisible by the 4 token shards"):
        compile_lib.Generation(6, 64, 16).check(layout.mesh)


# Total parameters as the model cards state them, and half a unit of their last digit.
PUBLISHED_TOTALS = {"mixtral_8x7b": (46.7e9, 0.05e9), "olmoe_1b_7b": (6.9e9, 0.05e9), "qwen2_57b_a14b": (57e9, 0.5e9),
                    "qwen1_5_moe_a2_7b": (14.3e9, 0.05e9),
                    "qwen3_30b_a3b": (30.5e9, 0.05e9), "deepseek_v3": (671e9, 0.5e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_shipped_architectures_read_by_the_hf_families_have_the_published_parameter_counts(name):
    # The config.json fields moejax.aot --hf compiles, through the same family code as moejax.hf.load: the totals
    # of the models' cards, to the digits they state.
    from moejax.aot import pretrained
    from moejax.aot.compile import params_count
    model = pretrained.model(name)
    assert model.config.dtype == model.config.param_dtype == "bfloat16"
    n = params_count(model, S((1, 1), jnp.int32))
    total, tolerance = PUBLISHED_TOTALS[name]
    assert abs(n - total) <= tolerance, n


def test_a_bad_hf_architecture_is_one_line_naming_the_flag(tmp_path):
    from moejax.aot import pretrained
    with pytest.raises(ValueError, match=r"^--hf='nope': not a shipped architecture \(deepseek_v3, mixtral_8x7b"):
        pretrained.lm_config("nope")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"^--hf='.*': .*llama"):
        pretrained.lm_config(str(tmp_path))


# ---------------------------------------------------------------- python -m moejax.aot


def _aot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "moejax.aot", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_aot_cli_prints_the_table_writes_json_and_exits_0_when_it_fits(tmp_path):
    out = _aot("--config=configs/lm_tiny.py", "--target=tpu:v5e:2x2", "--config.model.num_layers=1",
               "--gen_new_tokens=16", f"--json={tmp_path / 'r.json'}")
    assert out.returncode == 0, out.stderr
    assert "transformer_lm for tpu:v5e:2x2: 4 x TPU v5 lite" in out.stdout
    for row in ("train step (inputs [16, 128])", "generation prefill (batch 16, prompt 128, cache 144 slots)",
                "generation decode (one token)", "train state (params+opt+rest)", "variables + KV cache",
                "temporaries", "total", "fits: yes", "compiled FLOPs", "XLA cost model estimate",
                "collectives per device", "layer 0: dropless dispatch on", "compiled kernel calls"):
        assert row in out.stdout, row
    assert out.stdout.count("fits: yes") == 3
    assert out.stderr == "", out.stderr         # no libtpu warnings, no third-party log lines
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fits"] and report["devices"] == 4
    assert [p["name"] for p in report["programs"]] == ["train_step", "prefill", "decode"]
    train, prefill, decode = report["programs"]
    assert train["memory"]["total"] > train["memory"]["state"] > 0
    assert train["flops"]["compiled_per_device"] > 0 and train["flops"]["analytic"] > 0
    assert prefill["flops"]["analytic"] > 0 and decode["flops"]["analytic"] is None
    assert report["generation"] == {"batch": 16, "prompt_len": 128, "new_tokens": 16}


@needs_libtpu
def test_aot_cli_compiles_a_pretrained_architecture_from_its_config_json():
    # A Hugging Face directory's config.json (the tiny Mixtral fixture), fine-tuned with float32 master weights.
    out = _aot("--config=configs/hf_finetune.py", "--hf=tests/fixtures/hf/mixtral", "--target=tpu:v5e:2x2",
               "--programs=train,decode", "--config.data.seq_len=64", "--config.data.batch_size=4", "--gen_batch=4",
               "--gen_prompt_len=32", "--gen_new_tokens=8", "--config.mesh.expert=4", "--config.mesh.data=1")
    assert out.returncode == 0, out.stderr
    assert "tests/fixtures/hf/mixtral for tpu:v5e:2x2" in out.stdout
    assert "(float32 for train, bfloat16 for generation), compute bfloat16" in out.stdout
    assert out.stdout.count("fits: yes") == 2 and "ragged-all-to-all" in out.stdout


@needs_libtpu
def test_aot_cli_exits_1_with_one_line_when_the_model_does_not_fit():
    # About 52 B parameters (one layer of 64 experts of 8192 x 32768 x 3) with AdamW, on 16 GiB v5e chips.
    out = _aot("--config=configs/lm_tiny.py", "--target=tpu:v5e:2x2", "--config.model.num_layers=1",
               "--programs=train", "--config.model.d_model=8192",
               "--config.model.moe.hidden_dim=32768", "--config.model.moe.num_experts=64")
    assert out.returncode == 1, out.stderr
    assert "fits: NO" in out.stdout
    # The TPU compiler itself refuses it, with its own numbers (when a compiler accepts a program too big for the
    # table's memory, the line names the per-device bytes and the chip's memory instead).
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: does not fit: ") and "exceeds available HBM" in out.stderr, out.stderr


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--target=tpu:v5e:2x3x4x5"], "error: --target='tpu:v5e:2x3x4x5': topology"),
    (["--target=tpu:v5e:2x2", "--config.mesh.data=3"], "error: mesh: data*fsdp*expert*tensor = 3*1*1*1 = 3 must "
                                                        "equal the number of devices (4)"),
    (["--target=tpu:v5e:2x2", "--config.model.moe.num_experts=6", "--config.mesh.expert=4", "--config.mesh.data=1"],
     "error: model layer 0: num_experts=6 must be divisible by mesh.expert=4"),
    (["--target=tpu:v5e:2x2", "--programs=train,sample"], "error: --programs: unknown program 'sample'"),
    (["--target=tpu:v5e:2x2", "--gen_batch=6"], "error: --gen_batch=6: must be divisible by the 4 token shards"),
    (["--target=tpu:v5e:2x2", "--hf=nope"], "error: --hf='nope': not a shipped architecture"),
    (["--target=tpu:v5e:2x2", "--config.model.num_layers=1", "--config.model.moe.dispatch.mode=capacity",
      "--config.model.moe.dispatch.capacity_impl=pallas"],
     "error: dispatch.groups=1: capacity_impl='pallas' runs a kernel per device on tpu, so routing groups must be "
     "whole on each of the 4 token shards"),
])
def test_aot_cli_bad_input_is_one_line_and_exit_2_before_compiling(args, message):
    out = _aot("--config=configs/lm_tiny.py", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert out.stdout == ""


@needs_libtpu
def test_with_libtpu_installed_a_cpu_user_sees_no_tpu_warnings():
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_", "ALLOW_MULTIPLE"))}
    code = "import moejax, jax; print(jax.default_backend(), len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[0] == "cpu", out.stderr
    assert out.stderr == ""


# ---------------------------------------------------------------- NVIDIA H100 (with jax's CUDA plugin)


@needs_cuda_plugin
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernels_and_both_gradients_compile_for_h100(dtype):
    lhs, rhs, gs = S((300, 200), dtype), S((8, 200, 330), dtype), S((8,), jnp.int32)
    assert compiled_kernels("gpu:h100:1", gmm_fwd_bwd(kernels.gmm_gpu), lhs, rhs, gs) == 3
    x, plan, w = S((100, 200), dtype), S((100, 2), jnp.int32), S((100, 2), jnp.float32)
    fwd_bwd = capacity_fwd_bwd(kernels.capacity_dispatch_triton, kernels.capacity_combine_triton, 8 * 27)
    assert compiled_kernels("gpu:h100:1", fwd_bwd, x, plan, w) == 5


@needs_cuda_plugin
def test_auto_on_an_h100_mesh_compiles_a_kernel_that_does_only_the_routed_work_not_ragged_dot():
    # From this CPU host tokamax could only emit its XLA fallback (a dense product over all experts, found with this
    # test: f32[8, 512, 256] dot for 512 routed rows), so auto takes moejax's Triton kernel; no dense dot is left.
    from moejax.dispatch.backends.gmm import tokamax as tokamax_backend
    t = target("gpu:h100:1")
    with jax.set_mesh(Mesh(np.array(t.devices[:1]), ("x",))):
        from moejax.dispatch import gmm as gmm_lib
        assert gmm_lib.resolve_name("auto") == ("tokamax" if tokamax_backend.host_is_gpu() else "pallas_triton")
        auto = get_gmm("auto")
    lhs, rhs, gs = S((512, 256), jnp.bfloat16), S((8, 256, 256), jnp.bfloat16), S((8,), jnp.int32)
    assert compiled_kernels("gpu:h100:1", gmm_fwd_bwd(auto), lhs, rhs, gs) >= 3


@needs_cuda_plugin
def test_aot_cli_compiles_the_lm_train_step_for_h100():
    out = _aot("--config=configs/lm_tiny.py", "--target=gpu:h100:1", "--config.model.num_layers=1",
               "--gen_new_tokens=16")
    assert out.returncode == 0, out.stderr
    assert "1 x NVIDIA H100 80GB HBM3" in out.stdout and out.stdout.count("fits: yes") == 3
    assert "compiled FLOPs: not reported by the compiler for gpu" in out.stdout


@needs_cuda_plugin
def test_data_parallel_train_step_for_two_h100s_runs_the_triton_kernels_on_each_devices_tokens(lm_tiny):
    from moejax.aot.compile import compile_train
    config = lm_tiny()
    config.model.num_layers = 1
    config.mesh.data = 2
    program, backends, _ = compile_train(config, target("gpu:h100:2"))
    assert {name for _, _, name, _ in backends.layers} == {"pallas_triton"}
    assert program.kernel_calls >= 9                   # three expert matmuls, forward and both gradients
    assert program.collectives["all-gather"]["count"] == 0
