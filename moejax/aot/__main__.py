"""``python -m moejax.aot --config=<config.py> --target=<target> [--config.<field>=<value> ...] [--json=PATH]``.

Compiles the config's train step for a TPU topology or N NVIDIA GPUs on this (CPU) machine, from abstract shapes
(nothing the size of the model is allocated), and prints per device: the train state, the compiled program's
arguments, outputs, temporaries and their total against the device's memory; the compiled FLOPs beside moejax's
analytic count; on TPU the XLA cost model's step-time estimate and the MFU it implies (an estimate, never a
measurement); the collectives of the optimised HLO; the dispatch backend each MoE layer selected on the target and
the compiled kernel calls; lower and compile times. ``--json`` writes the same.

Exit status: 0 compiled and fits; 1 compiled but does not fit (one line names the bytes); 2 bad input (an unknown
target or topology, a mesh that does not match the target's devices, a missing compiler, a bad config field), one
line, before compiling. Targets: :mod:`moejax.aot.targets`. Runs with ``JAX_PLATFORMS=cpu`` unless set otherwise.
"""
from __future__ import annotations

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
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of errors printed as one line.")
flags.mark_flags_as_required(["config", "target"])
_OVERRIDES: list[tuple[str, str]] = []


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB"


def report(config: Any, target_spec: str) -> dict[str, Any]:
    """Compiles and returns the report as a JSON-able dict (see the module doc); raises ``ValueError`` (bad input)."""
    from moejax.aot import compile as compile_lib
    from moejax.aot import targets
    from moejax.training.throughput import Throughput

    target = targets.make_target(target_spec)
    program, backends, facts = compile_lib.compile_train(config, target)
    # The trainer's own FLOPs and peak (what its logged MFU uses), for the target's devices.
    rates = Throughput(facts["model"].config, facts["input_shape"], device_kind=target.device_kind,
                       num_devices=target.num_devices)
    dtype = rates.dtype
    analytic = (rates.flops.training() * facts["input_shape"][0] * rates.tokens_per_example
                if rates.flops is not None else None)
    why_no_flops = rates.why_no_flops
    compiled_flops = program.cost.get("flops")
    peak = rates.peak / target.devices_per_chip if rates.peak else None       # the table's peak is per chip
    seconds = program.cost.get("optimal_seconds")
    estimate: dict[str, Any] = {}
    if target.platform == "tpu":
        if seconds is not None and seconds > 0:
            estimate = {"step_seconds": seconds,
                        "mfu": (analytic / (target.num_devices * peak * seconds)) if analytic and peak else None}
        else:
            estimate = {"step_seconds": None, "why": f"the cost model returned optimal_seconds={seconds}"}
    total = program.memory.total
    return {
        "target": target.spec, "platform": target.platform, "device_kind": target.device_kind,
        "devices": target.num_devices, "devices_per_chip": target.devices_per_chip,
        "memory_per_device": target.memory_per_device, "memory_source": target.memory_source,
        "mesh": facts["mesh"], "params": facts["params"], "input_shape": list(facts["input_shape"]), "dtype": dtype,
        "program": program.name,
        "memory": {"state": program.state_bytes, "arguments": program.memory.arguments,
                   "outputs": program.memory.outputs, "aliased": program.memory.aliased,
                   "temporaries": program.memory.temporaries, "code": program.memory.code, "total": total},
        "fits": total <= target.memory_per_device, "memory_fraction": total / target.memory_per_device,
        "flops": {"compiled_per_device": compiled_flops,
                  "compiled_total": compiled_flops * target.num_devices if compiled_flops is not None else None,
                  "analytic_per_step": analytic, "why_no_analytic": why_no_flops},
        "cost_model_estimate": estimate, "peak_flops_per_device": peak,
        "collectives": program.collectives,
        "dispatch": [{"layer": i, "mode": mode, "backend": name, "interpreted": interp}
                     for i, mode, name, interp in backends.layers],
        "kernel_calls": program.kernel_calls,
        "lower_seconds": program.lower_seconds, "compile_seconds": program.compile_seconds,
    }


def lines(r: dict[str, Any]) -> list[str]:
    """The printed table of a :func:`report`."""
    m = r["memory"]
    out = [f"moejax.aot: {r['program']} for {r['target']}: {r['devices']} x {r['device_kind']} "
           f"({r['devices_per_chip']} per chip), mesh {r['mesh']}, {r['params']:,} parameters, inputs "
           f"{r['input_shape']}, {r['dtype']}",
           f"  per device                     bytes        GiB",
           f"  train state (params+opt+rest)  {m['state']:>14,}  {m['state'] / (1 << 30):9.3f}",
           f"  arguments                      {m['arguments']:>14,}  {m['arguments'] / (1 << 30):9.3f}",
           f"  outputs                        {m['outputs']:>14,}  {m['outputs'] / (1 << 30):9.3f}",
           f"  aliased (outputs in args)      {-m['aliased']:>14,}  {-m['aliased'] / (1 << 30):9.3f}",
           f"  temporaries                    {m['temporaries']:>14,}  {m['temporaries'] / (1 << 30):9.3f}",
           f"  generated code                 {m['code']:>14,}  {m['code'] / (1 << 30):9.3f}",
           f"  total                          {m['total']:>14,}  {m['total'] / (1 << 30):9.3f}  "
           f"({100 * r['memory_fraction']:.1f}% of {_gib(r['memory_per_device'])}: {r['memory_source']})",
           f"  fits: {'yes' if r['fits'] else 'NO'}"]
    f = r["flops"]
    if f["compiled_per_device"] is not None:
        text = f"  compiled FLOPs per step: {f['compiled_total']:.4g} ({f['compiled_per_device']:.4g} per device)"
        if f["analytic_per_step"]:
            text += (f"; moejax analytic {f['analytic_per_step']:.4g} (compiled/analytic "
                     f"{f['compiled_total'] / f['analytic_per_step']:.2f})")
        out.append(text)
    else:
        out.append(f"  compiled FLOPs: not reported by the compiler for {r['platform']} (no cost analysis); "
                   f"moejax analytic {f['analytic_per_step']:.4g} per step" if f["analytic_per_step"] else
                   "  compiled FLOPs: not reported by the compiler")
    est = r["cost_model_estimate"]
    if r["platform"] == "tpu":
        if est.get("step_seconds"):
            mfu = f", implied MFU {100 * est['mfu']:.1f}%" if est.get("mfu") is not None else ""
            out.append(f"  XLA cost model estimate (not a measurement; blind to the inside of Pallas custom calls): "
                       f"step {est['step_seconds'] * 1e3:.3f} ms{mfu}")
        else:
            out.append(f"  XLA cost model estimate: none ({est.get('why')})")
    coll = ", ".join(f"{op} {v['count']} ({_gib(v['bytes'])})" for op, v in r["collectives"].items() if v["count"])
    out.append(f"  collectives per device: {coll or 'none'}")
    for d in r["dispatch"]:
        out.append(f"  layer {d['layer']}: {d['mode']} dispatch on {d['backend']}"
                   + (" (in the Pallas interpreter)" if d["interpreted"] else ""))
    out.append(f"  compiled kernel calls (Pallas/Mosaic/Triton) in the HLO: {r['kernel_calls']}")
    out.append(f"  lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s")
    return out


def main(argv: list[str]) -> None:
    del argv
    import logging
    logging.getLogger().setLevel(logging.WARNING)       # jax's and absl's INFO lines; the report says what ran
    from moejax.aot import targets
    config = _CONFIG.value
    cli.apply_or_exit(config, _OVERRIDES)
    from moejax.aot.compile import DoesNotFit
    try:
        targets.parse(_TARGET.value)
        targets.check_compiler(_TARGET.value)
        r = report(config, _TARGET.value)
    except DoesNotFit as e:
        print(f"moejax.aot: train_step for {_TARGET.value}\n  fits: NO (the compiler refused it: {e})")
        if _JSON.value:
            with open(_JSON.value, "w", encoding="utf-8") as fh:
                json.dump({"target": _TARGET.value, "fits": False, "compiler": str(e)}, fh, indent=2)
        print(f"error: does not fit: {e}", file=sys.stderr)
        sys.exit(1)
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
    if not r["fits"]:
        print(f"error: does not fit: {r['memory']['total']:,} bytes ({_gib(r['memory']['total'])}) per device > "
              f"{r['memory_per_device']:,} bytes ({_gib(r['memory_per_device'])}) of {r['device_kind']} memory",
              file=sys.stderr)
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    rest, _OVERRIDES[:] = cli.split_or_exit(sys.argv if argv is None else argv)
    sys.argv = rest
    app.run(main, argv=rest)


if __name__ == "__main__":
    run()
