"""``python -m moejax.aot --config=<config.py> --target=<target> [--config.<field>=<value> ...] [--programs=...]
[--hf=<architecture>] [--gen_batch=B --gen_prompt_len=P --gen_new_tokens=N] [--json=PATH]``.

Compiles a config's programs for a TPU topology or N NVIDIA GPUs on this (CPU) machine, from abstract shapes
(nothing the size of the model is allocated): the train step, and for a language model generation's prefill and
one-token decode (``--programs``, default all that apply); ``--hf`` compiles a pretrained architecture
(:mod:`moejax.aot.pretrained`) with the config's batch, optimiser and mesh. For each program it prints per device:
the resident state (train state, or variables and KV cache), the compiled program's arguments, outputs,
temporaries and their total against the device's memory; the compiled FLOPs beside moejax's analytic count; on TPU
the XLA cost model's time estimate and the MFU it implies (an estimate, never a measurement); the collectives of
the optimised HLO; the compiled kernel calls; lower and compile times; and the dispatch backend each MoE layer
selected on the target. ``--json`` writes the same.

Exit status: 0 compiled and every program fits; 1 some program does not fit (one line names its bytes, or the
compiler's refusal); 2 bad input (an unknown target or topology, a mesh that does not match the target's devices,
a missing compiler, a bad config field or flag), one line, before compiling. Targets: :mod:`moejax.aot.targets`.
Runs with ``JAX_PLATFORMS=cpu`` unless set otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from typing import Any

if "JAX_PLATFORMS" not in os.environ:
    # Compile only: the host's accelerators (if any) are not used, and the CUDA plugin, which refuses to register on a
    # machine without a GPU unless the platforms are given, registers its deviceless compiler. ``python -m`` has
    # imported jax already (through moejax's __init__), before any device query: the config still takes it.
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_platforms", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moejax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                          lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "tpu:<generation>:<topology> (tpu:v5e:2x2, tpu:v5p:4x4x4) or "
                              "gpu:<kind>:<count> (gpu:h100:8).")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Programs to compile: train, prefill, decode (default: all three for "
                              "a language model, train otherwise).")
_HF = flags.DEFINE_string("hf", None, "Compile a pretrained architecture instead of the config's model: a shipped "
                          "name (moejax/aot/hf_architectures/<name>.json: deepseek_v3, mixtral_8x7b, "
                          "olmoe_1b_7b, qwen3_30b_a3b, ...), a config.json or a Hugging Face model directory. The config "
                          "still gives the batch, sequence length, optimiser and mesh.")
_HF_MASTER = flags.DEFINE_enum("hf_master_dtype", "float32", ["float32", "bfloat16"],
                               "With --hf: the parameter (and AdamW moment) dtype of the train program; it computes "
                               "in bfloat16. Generation always uses bfloat16 parameters, as moejax.hf.load(dtype="
                               "'bfloat16') places them.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", None, "Generation: sequences per call (default: data.batch_size).")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt_len", None, "Generation: prompt tokens (default: data.seq_len).")
_GEN_NEW = flags.DEFINE_integer("gen_new_tokens", 128, "Generation: new tokens (the KV cache holds prompt + new).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of errors printed as one line.")
flags.mark_flags_as_required(["config", "target"])
_OVERRIDES: list[tuple[str, str]] = []
PROGRAMS = ("train", "prefill", "decode")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB"


def _program_dict(program: Any, target: Any, analytic: float | None, why_no_flops: str | None,
                  peak: float | None) -> dict[str, Any]:
    compiled_flops = program.cost.get("flops")
    seconds = program.cost.get("optimal_seconds")
    estimate: dict[str, Any] = {}
    if target.platform == "tpu":
        if seconds is not None and seconds > 0:
            estimate = {"step_seconds": seconds,
                        "mfu": (analytic / (target.num_devices * peak * seconds)) if analytic and peak else None}
        else:
            estimate = {"step_seconds": None, "why": f"the cost model returned optimal_seconds={seconds}"}
    m = program.memory
    return {
        "name": program.name,
        "memory": {"state": program.state_bytes, "arguments": m.arguments, "outputs": m.outputs,
                   "aliased": m.aliased, "temporaries": m.temporaries, "code": m.code, "total": m.total},
        "fits": m.total <= target.memory_per_device, "memory_fraction": m.total / target.memory_per_device,
        "flops": {"compiled_per_device": compiled_flops,
                  "compiled_total": compiled_flops * target.num_devices if compiled_flops is not None else None,
                  "analytic": analytic, "why_no_analytic": why_no_flops},
        "cost_model_estimate": estimate, "collectives": program.collectives, "kernel_calls": program.kernel_calls,
        "lower_seconds": program.lower_seconds, "compile_seconds": program.compile_seconds,
    }


def report(config: Any, target_spec: str, programs: list[str] | None = None, hf: str | None = None,
           hf_master_dtype: str = "float32", gen_batch: int | None = None, gen_prompt_len: int | None = None,
           gen_new_tokens: int = 128) -> dict[str, Any]:
    """Compiles and returns the report as a JSON-able dict (see the module doc); raises ``ValueError`` (bad input)
    before compiling anything. A program the compiler refuses for memory is reported as not fitting (its
    ``refused`` says the compiler's words) and the others are still compiled."""
    from moejax.aot import compile as compile_lib
    from moejax.aot import pretrained, targets
    from moejax.models.config import LMConfig
    from moejax.training.throughput import Throughput

    target = targets.make_target(target_spec)
    layout = compile_lib.Layout.of(config, target)
    meta, _, example = compile_lib.data_shapes(config)
    if hf is not None:
        if meta.task != "lm":
            raise ValueError(f"--hf={hf!r}: needs a language-model config (data.name of an LM dataset); "
                             f"{config['data']['name']!r} is a {meta.task} dataset")
        train_model = pretrained.model(hf, dtype="bfloat16", param_dtype=hf_master_dtype)
        gen_model = pretrained.model(hf, dtype="bfloat16", param_dtype="bfloat16")
    else:
        from moejax import models as models_lib
        train_model = gen_model = models_lib.build_model(config["model"], num_classes=meta.num_classes,
                                                         vocab_size=meta.vocab_size, input_shape=meta.input_shape)
    is_lm = isinstance(gen_model.config, LMConfig)
    programs = list(programs or (PROGRAMS if is_lm else ("train",)))
    for name in programs:
        if name not in PROGRAMS:
            raise ValueError(f"--programs: unknown program {name!r}; choose from {', '.join(PROGRAMS)}")
        if name != "train" and not is_lm:
            raise ValueError(f"--programs={name}: generation needs a language model (model.kind=transformer_lm)")
    gen = compile_lib.Generation(gen_batch if gen_batch is not None else int(example.shape[0]),
                                 gen_prompt_len if gen_prompt_len is not None else int(example.shape[1]),
                                 gen_new_tokens) if is_lm else None
    if gen is not None and any(p != "train" for p in programs):
        from moejax.generation.decode import for_decoding
        gen.check(layout.mesh)
        compile_lib.loop.check_model_on_mesh(type(gen_model)(for_decoding(gen_model.config)), layout.mesh)
    if "train" in programs:
        compile_lib.loop._check_divisible(config, layout.mesh)
        compile_lib.loop.check_model_on_mesh(train_model, layout.mesh)

    rates = Throughput(train_model.config, tuple(example.shape), device_kind=target.device_kind,
                       num_devices=target.num_devices)
    peak = rates.peak / target.devices_per_chip if rates.peak else None       # the table's peak is per chip
    rows: list[dict[str, Any]] = []
    backends = compile_lib.dispatch_backends(train_model, target.platform)

    def refused(name: str, err: Exception) -> dict[str, Any]:
        return {"name": name, "fits": False, "refused": str(err)}

    if "train" in programs:
        analytic = (rates.flops.training() * example.shape[0] * rates.tokens_per_example
                    if rates.flops is not None else None)
        try:
            program, _, _ = compile_lib.compile_train(config, target, train_model if hf is not None else None)
            rows.append(_program_dict(program, target, analytic, rates.why_no_flops, peak))
        except compile_lib.DoesNotFit as e:
            rows.append(refused("train_step", e))
    wanted = [p for p in programs if p != "train"]
    if wanted:
        variables = compile_lib.abstract_variables(gen_model, layout)
        prefill_rates = Throughput(gen_model.config, (gen.batch, gen.prompt_len), device_kind=target.device_kind,
                                   num_devices=target.num_devices)
        flops = {"prefill": (prefill_rates.flops.forward() * gen.batch * gen.prompt_len
                             if prefill_rates.flops is not None else None), "decode": None}
        why = {"prefill": prefill_rates.why_no_flops, "decode": "moejax counts FLOPs of full sequences, not of one "
               "cached token"}
        try:
            for program in compile_lib.compile_generate(gen_model, variables, target, layout, gen, wanted):
                rows.append(_program_dict(program, target, flops[program.name], why[program.name], peak))
        except compile_lib.DoesNotFit as e:
            rows.append(refused(str(e).split(":")[0], e))
    return {
        "target": target.spec, "platform": target.platform, "device_kind": target.device_kind,
        "devices": target.num_devices, "devices_per_chip": target.devices_per_chip,
        "memory_per_device": target.memory_per_device, "memory_source": target.memory_source,
        "mesh": {a: int(s) for a, s in layout.mesh.shape.items()},
        "model": hf if hf is not None else config["model"].get("kind"),
        "params": compile_lib.params_count(gen_model, example), "input_shape": list(example.shape),
        "dtype": rates.dtype,
        "param_dtype": {k: getattr(m.config, "param_dtype", None) for k, m, on in
                        (("train", train_model, "train" in programs), ("generation", gen_model, bool(wanted))) if on},
        "generation": dataclasses.asdict(gen) if gen is not None and wanted else None,
        "peak_flops_per_device": peak,
        "fits": all(r["fits"] for r in rows), "programs": rows,
        "dispatch": [{"layer": i, "mode": mode, "backend": name, "interpreted": interp}
                     for i, mode, name, interp in backends.layers],
    }


_PROGRAM_TITLES = {"train_step": "train step", "prefill": "generation prefill", "decode": "generation decode (one "
                   "token)"}


def lines(r: dict[str, Any]) -> list[str]:
    """The printed table of a :func:`report`."""
    out = [f"moejax.aot: {r['model']} for {r['target']}: {r['devices']} x {r['device_kind']} "
           f"({r['devices_per_chip']} per chip), mesh {r['mesh']}, {r['params']:,} parameters "
           f"({', '.join(f'{v} for {k}' for k, v in r['param_dtype'].items())}), compute {r['dtype']}"]
    for d in r["dispatch"]:
        out.append(f"  layer {d['layer']}: {d['mode']} dispatch on {d['backend']}"
                   + (" (in the Pallas interpreter)" if d["interpreted"] else ""))
    g = r["generation"]
    for p in r["programs"]:
        shape = (f"inputs {r['input_shape']}" if p["name"] == "train_step" else
                 f"batch {g['batch']}, prompt {g['prompt_len']}, cache {g['prompt_len'] + g['new_tokens']} slots")
        out.append(f"{_PROGRAM_TITLES.get(p['name'], p['name'])} ({shape})")
        if "refused" in p:
            out.append(f"  fits: NO (the compiler refused it: {p['refused']})")
            continue
        m = p["memory"]
        state = "train state (params+opt+rest)" if p["name"] == "train_step" else "variables + KV cache        "
        out += [f"  per device                     bytes        GiB",
                f"  {state}  {m['state']:>14,}  {m['state'] / (1 << 30):9.3f}",
                f"  arguments                      {m['arguments']:>14,}  {m['arguments'] / (1 << 30):9.3f}",
                f"  outputs                        {m['outputs']:>14,}  {m['outputs'] / (1 << 30):9.3f}",
                f"  aliased (outputs in args)      {-m['aliased']:>14,}  {-m['aliased'] / (1 << 30):9.3f}",
                f"  temporaries                    {m['temporaries']:>14,}  {m['temporaries'] / (1 << 30):9.3f}",
                f"  generated code                 {m['code']:>14,}  {m['code'] / (1 << 30):9.3f}",
                f"  total                          {m['total']:>14,}  {m['total'] / (1 << 30):9.3f}  "
                f"({100 * p['memory_fraction']:.1f}% of {_gib(r['memory_per_device'])}: {r['memory_source']})",
                f"  fits: {'yes' if p['fits'] else 'NO'}"]
        f = p["flops"]
        if f["compiled_per_device"] is not None:
            text = f"  compiled FLOPs: {f['compiled_total']:.4g} ({f['compiled_per_device']:.4g} per device)"
            if f["analytic"]:
                text += (f"; moejax analytic {f['analytic']:.4g} (compiled/analytic "
                         f"{f['compiled_total'] / f['analytic']:.2f})")
            out.append(text)
        else:
            out.append(f"  compiled FLOPs: not reported by the compiler for {r['platform']} (no cost analysis)"
                       + (f"; moejax analytic {f['analytic']:.4g}" if f["analytic"] else ""))
        est = p["cost_model_estimate"]
        if r["platform"] == "tpu":
            if est.get("step_seconds"):
                mfu = f", implied MFU {100 * est['mfu']:.1f}%" if est.get("mfu") is not None else ""
                out.append(f"  XLA cost model estimate (not a measurement; blind to the inside of Pallas custom "
                           f"calls): {est['step_seconds'] * 1e3:.3f} ms{mfu}")
            else:
                out.append(f"  XLA cost model estimate: none ({est.get('why')})")
        coll = ", ".join(f"{op} {v['count']} ({_gib(v['bytes'])})" for op, v in p["collectives"].items()
                         if v["count"])
        out.append(f"  collectives per device: {coll or 'none'}")
        out.append(f"  compiled kernel calls (Pallas/Mosaic/Triton) in the HLO: {p['kernel_calls']}")
        out.append(f"  lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s")
    return out


def main(argv: list[str]) -> None:
    del argv
    import logging
    logging.getLogger().setLevel(logging.WARNING)       # jax's and absl's INFO lines; the report says what ran
    from moejax.aot import targets
    config = _CONFIG.value
    cli.apply_or_exit(config, _OVERRIDES)
    try:
        targets.parse(_TARGET.value)
        targets.check_compiler(_TARGET.value)
        r = report(config, _TARGET.value, _PROGRAMS.value, _HF.value, _HF_MASTER.value, _GEN_BATCH.value,
                   _GEN_PROMPT.value, _GEN_NEW.value)
    except ValueError as e:
        if _DEBUG.value:
            traceback.print_exc()
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    for line in lines(r):
        print(line)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as fh:
            json.dump(r, fh, indent=2, sort_keys=True)
    bad = [p for p in r["programs"] if not p["fits"]]
    if bad:
        p = bad[0]
        if "refused" in p:
            why = p["refused"]
        else:
            total = p["memory"]["total"]
            why = (f"{p['name']}: {total:,} bytes ({_gib(total)}) per device > {r['memory_per_device']:,} bytes "
                   f"({_gib(r['memory_per_device'])}) of {r['device_kind']} memory")
        print(f"error: does not fit: {why}" + (f" (and {len(bad) - 1} more program(s))" if len(bad) > 1 else ""),
              file=sys.stderr)
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    rest, _OVERRIDES[:] = cli.split_or_exit(sys.argv if argv is None else argv)
    sys.argv = rest
    app.run(main, argv=rest)


if __name__ == "__main__":
    run()
