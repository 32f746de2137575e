"""Tokens/s and model FLOPs utilisation (MFU) of the trainer's logging windows.

``MFU = analytic training FLOPs of the window's tokens / (window seconds * devices * peak FLOP/s per device)``, with
the FLOPs of :mod:`moejax.training.flops` (3x forward; the routed experts counted at the step's measured
``experts_per_token``, so dropped token copies are excluded) and the device's dense peak
from :data:`PEAK_TFLOPS`, keyed by ``jax.devices()[0].device_kind``. A device kind not in the table (CPU, an
unlisted GPU) or a model without an analytic count gets no MFU; tokens/s is always reported.

The window is the wall-clock time of the train steps since the last log line, evaluation excluded; the step that
compiles a train step (the first one, and the first of each new scheduled k) is left out of its window's rates
unless it is the window's only step, so the first log line does not report compilation as slowness.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from moejax.training.flops import ModelFlops, UnsupportedFlops, model_flops

# Dense (no sparsity) peak TFLOP/s per JAX device: {device_kind: {dtype: peak}}. "float32" is what float32 matmuls
# run at under JAX's default precision: TF32 tensor cores on NVIDIA Ampere and later, one bfloat16 pass on TPU.
# A JAX device is one chip, except TPU v2/v3 where it is one of the chip's two TensorCores (half the chip's peak).
# Sources: NVIDIA data sheets (A100: nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf; H100 SXM/PCIe/NVL: nvidia.com/en-us/data-center/h100/;
# H200: nvidia.com/en-us/data-center/h200/; B200: nvidia.com/en-us/data-center/hgx/ (HGX B200, per GPU);
# L4: nvidia.com/en-us/data-center/l4/; L40S: nvidia.com/en-us/data-center/l40s/), the sheets' sparse figures
# halved; Google Cloud TPU docs (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, /system-architecture-tpu-vm for
# v2/v3), bf16 peak per chip.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},     # SXM
    "NVIDIA H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "NVIDIA H100 NVL": {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5},
    "NVIDIA H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
    "NVIDIA B200": {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0},
    "NVIDIA L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0},
    "NVIDIA L40S": {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0},
    "TPU v2": {"bfloat16": 22.5, "float32": 22.5},
    "TPU v3": {"bfloat16": 61.5, "float32": 61.5},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},                                # v5e
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},                                     # v5p
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},                                # v6e (Trillium)
}


def device_peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one JAX device of ``device_kind`` for ``dtype`` matmuls, or None if unknown."""
    peak = PEAK_TFLOPS.get(device_kind, {}).get(dtype)
    return None if peak is None else peak * 1e12


class Window:
    """The train steps of one logging window: their examples and tokens, and their wall-clock time (``clock``)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.start, self.paused_seconds = self.clock(), 0.0
        self.examples = self.tokens = 0
        self.compile_seconds, self.compile_examples, self.compile_tokens = 0.0, 0, 0

    def add(self, examples: int, tokens: int, *, compiled: bool = False, seconds: float = 0.0) -> None:
        """One finished step; ``compiled``: it compiled its train step, taking ``seconds`` (kept aside)."""
        if compiled:
            self.compile_seconds += seconds
            self.compile_examples += examples
            self.compile_tokens += tokens
        else:
            self.examples += examples
            self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation) is not the window's."""
        t = self.clock()
        try:
            yield
        finally:
            self.paused_seconds += self.clock() - t

    def counts(self) -> tuple[int, int, float]:
        """(examples, tokens, seconds): the steps that did not compile, or, if there are none, the ones that did."""
        seconds = self.clock() - self.start - self.paused_seconds
        if self.examples:
            return self.examples, self.tokens, max(seconds - self.compile_seconds, 1e-9)
        return self.compile_examples, self.compile_tokens, max(seconds, 1e-9)


class Throughput:
    """What a logging window's record gets: ``tokens_per_sec`` always; ``train_flops_per_token`` (analytic, 3x
    forward, routed experts at the logged step's measured experts per token) when the model has a count; ``mfu``
    when the device's peak is known too.

    model_config: the typed model config; inputs_shape: the global model input batch shape (LM: ``[B, L]``);
    device_kind, num_devices, dtype: default ``jax.devices()``'s first kind, their count, the config's ``dtype``.
    peak_tflops: the per-device peak to divide by instead of the table's (``train.peak_tflops``).
    """

    def __init__(self, model_config: Any, inputs_shape: Sequence[int], *, device_kind: str | None = None,
                 num_devices: int | None = None, dtype: str | None = None, peak_tflops: float | None = None):
        import jax
        self.device_kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
        self.num_devices = num_devices if num_devices is not None else jax.device_count()
        self.dtype = dtype or getattr(model_config, "dtype", "float32")
        self.flops: ModelFlops | None = None
        self.why_no_flops = ""
        try:
            self.flops = model_flops(model_config, seq_len=int(inputs_shape[1]) if len(inputs_shape) > 1 else None,
                                     input_dim=int(np.prod(inputs_shape[1:])))
        except UnsupportedFlops as err:
            self.why_no_flops = str(err)
        # train.peak_tflops: a device the table does not know (a CPU whose peak was measured, a new accelerator).
        self.peak = peak_tflops * 1e12 if peak_tflops else device_peak_flops(self.device_kind, self.dtype)
        self.lm = getattr(model_config, "KIND", None) == "transformer_lm"
        self.tokens_per_example = _tokens_per_example(model_config, inputs_shape)

    def describe(self) -> str:
        """The header line: FLOPs per token and the peak MFU is relative to, or why there is no MFU."""
        if self.flops is None:
            return f"moejax: no MFU: {self.why_no_flops}"
        text = (f"moejax: model FLOPs per token {self.flops.training():.4g} to train "
                f"(3x forward {self.flops.forward():.4g})")
        if self.peak is None:
            return text + f"; no MFU: no peak FLOP/s known for device kind {self.device_kind!r} ({self.dtype})"
        return text + (f"; MFU against {self.num_devices} x {self.peak / 1e12:g} TFLOP/s ({self.device_kind}, "
                       f"{self.dtype} dense peak)")

    def record(self, window: Window, experts_per_token: Sequence[Any] | None = None) -> dict[str, float]:
        """The window's rates: ``items_per_sec`` (tokens for an LM, else examples, as before), ``examples_per_sec``,
        ``tokens_per_sec`` and, where known, ``train_flops_per_token`` and ``mfu``. ``experts_per_token``: the
        step's metric of that name, one value per FFN layer (None: the nominal k)."""
        examples, tokens, seconds = window.counts()
        out = {"items_per_sec": (tokens if self.lm else examples) / seconds, "examples_per_sec": examples / seconds,
               "tokens_per_sec": tokens / seconds}
        if self.flops is None:
            return out
        measured = None
        if experts_per_token is not None and len(experts_per_token) == len(self.flops.experts):
            measured = [float(np.mean(np.asarray(e, np.float64))) for e in experts_per_token]
        per_token = self.flops.training(measured)
        out["train_flops_per_token"] = per_token
        if self.peak is not None:
            out["mfu"] = per_token * tokens / seconds / (self.num_devices * self.peak)
        return {k: v for k, v in out.items() if math.isfinite(v)}


def _tokens_per_example(cfg: Any, inputs_shape: Sequence[int]) -> int:
    """LM: the sequence length; ViT: its patches (and class token); otherwise an example is one token."""
    kind = getattr(cfg, "KIND", None)
    if kind == "transformer_lm":
        return int(inputs_shape[1])
    if kind == "vit":
        return cfg.num_patches + (1 if cfg.pooling == "cls" else 0)
    return 1

