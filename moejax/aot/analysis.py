"""What a compiled program says about itself: per-device memory, FLOPs, the cost model's time, collectives, kernels.

All numbers are the compiler's (``compiled.memory_analysis()``, ``compiled.cost_analysis()``, the optimised HLO text),
per device; nothing here runs the program.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
# Custom calls that prove a Pallas kernel was compiled (not interpreted): Mosaic on TPU, Triton on GPU.
KERNEL_TARGETS = {"tpu": ("tpu_custom_call",), "gpu": ("__gpu$xla.gpu.triton", "triton_kernel_call")}
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device: arguments, outputs, aliased (outputs that reuse an argument's buffer), temporaries, code."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        """What the program needs resident at its peak: arguments + outputs - aliased + temporaries + code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled: Any) -> "Memory":
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes))


def cost(compiled: Any) -> dict[str, float]:
    """The compiler's cost analysis (per device): ``flops``, ``bytes accessed``, ``optimal_seconds`` (TPU), or {}
    where the backend has none (XLA:GPU without a device)."""
    try:
        c = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return {}
    if isinstance(c, (list, tuple)):
        c = c[0] if c else None
    if not c:
        return {}
    return {k: float(v) for k, v in c.items() if k in ("flops", "bytes accessed", "optimal_seconds", "transcendentals")}


def _result_bytes(shape_text: str, op: str) -> int:
    """Bytes of an instruction's result given the text between ``=`` and the op name. For an async ``-start`` (a
    tuple of operand and result buffers) the last array is the result."""
    arrays = [(d, dims) for d, dims in _ARRAY.findall(shape_text) if d in _DTYPE_BYTES]
    if not arrays:
        return 0
    if op.endswith("-start") and len(arrays) > 1:
        arrays = arrays[-1:]
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in arrays)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """``{op: {"count", "bytes"}}`` of the collectives in optimised HLO text (async pairs counted once, at their
    start; bytes: the size of each op's result, per device)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(re.escape(op) for op in sorted(COLLECTIVES, key=len, reverse=True))
                         + r")(-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if m is None:
            continue
        op = m.group(2)
        out[op]["count"] += 1
        out[op]["bytes"] += _result_bytes(m.group(1), op + (m.group(3) or ""))
    return out


def kernel_calls(hlo: str, platform: str) -> int:
    """How many custom calls in the optimised HLO run a compiled Pallas kernel on ``platform``."""
    return sum(len(re.findall(r'custom_call_target="' + re.escape(t) + '"', hlo))
               for t in KERNEL_TARGETS.get(platform, ()))


__all__ = ["COLLECTIVES", "KERNEL_TARGETS", "Memory", "collectives", "cost", "kernel_calls"]
