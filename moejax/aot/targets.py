"""Compile targets: the devices of a TPU topology or of N NVIDIA GPUs, made on this host without the hardware.

``tpu:<generation>:<topology>`` (``tpu:v5e:2x2``, ``tpu:v5p:4x4x4``): ``libtpu`` (``pip install "jax[tpu]"``) gives
the compile-only devices of any topology of that generation (``jax.experimental.topologies.get_topology_desc``).
``gpu:<kind>:<count>`` (``gpu:h100:8``): jax's CUDA plugin (``pip install -e ".[aot-gpu]"``) gives N deviceless GPUs
described by a target-config file this project ships (``moejax/aot/gpu_targets/``). Either works with the CPU as
jax's default backend; no array is placed on the target.

Every bad target is a :class:`TargetError` (a ``ValueError``) of one line naming ``--target`` and what would work,
raised before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
from typing import Any

GPU_TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"

# TPU generations: topology-name prefix -> (device_kind jax reports, HBM per chip in bytes, source).
# HBM per chip from Google Cloud's system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
GiB = 1 << 30
TPU_GENERATIONS: dict[str, tuple[str, int, str]] = {
    "v4": ("TPU v4", 32 * GiB, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2 per chip"),
    "v5e": ("TPU v5 lite", 16 * GiB, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 per chip"),
    "v5p": ("TPU v5", 95 * GiB, "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e per chip"),
    "v6e": ("TPU v6 lite", 32 * GiB, "cloud.google.com/tpu/docs/v6e: 32 GiB HBM per chip"),
}
# GPU kinds: name in --target -> (target-config file, device memory in bytes, source).
GPU_KINDS: dict[str, tuple[str, int, str]] = {
    "h100": ("h100_sxm.txtpb", 80_000_000_000, "NVIDIA H100 SXM datasheet: 80 GB HBM3"),
    "h200": ("h200.txtpb", 141_000_000_000, "NVIDIA H200 product page: 141 GB HBM3e"),
}
EXAMPLES = "tpu:v5e:2x2, tpu:v5p:4x4x4, tpu:v4:2x2x1, tpu:v6e:4x4, gpu:h100:8, gpu:h200:1"


class TargetError(ValueError):
    """A bad ``--target`` (or the compiler it needs is not installed): one line, raised before compiling."""


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices of a compile target and what a report needs to know about them.

    spec: the ``--target`` text. platform: ``tpu`` or ``gpu``. devices: compile-only jax devices (in the order
    :func:`moejax.parallel.make_mesh` lays out). device_kind: what jax reports (keys
    :data:`moejax.training.throughput.PEAK_TFLOPS`). memory_per_device: bytes of HBM one device may use (a chip's
    HBM divided by its devices: a TPU v4 topology may expose the chip's two TensorCores as two devices).
    memory_source: where that number comes from. devices_per_chip: jax devices per chip.
    """

    spec: str
    platform: str
    devices: tuple[Any, ...]
    device_kind: str
    memory_per_device: int
    memory_source: str
    devices_per_chip: int = 1

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _fail(spec: str, why: str) -> None:
    raise TargetError(f"--target={spec!r}: {why}")


def parse(spec: str) -> tuple[str, str, str]:
    """``(platform, generation or kind, topology or count)``; a :class:`TargetError` for anything else."""
    if not isinstance(spec, str) or spec.count(":") != 2:
        _fail(spec, f"must be tpu:<generation>:<topology> or gpu:<kind>:<count>, e.g. {EXAMPLES}")
    platform, kind, rest = spec.split(":")
    if platform == "tpu":
        if kind not in TPU_GENERATIONS:
            _fail(spec, f"unknown TPU generation {kind!r}; known: {sorted(TPU_GENERATIONS)}")
        if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", rest):
            _fail(spec, f"topology {rest!r} must be chips per dimension, e.g. 2x2 (v5e, v6e) or 2x2x1 (v4, v5p)")
    elif platform == "gpu":
        if kind not in GPU_KINDS:
            _fail(spec, f"no shipped target config for GPU kind {kind!r}; shipped: {sorted(GPU_KINDS)} "
                        f"(add a GpuTargetConfigProto text file to {GPU_TARGETS_DIR})")
        if not re.fullmatch(r"[1-9]\d*", rest):
            _fail(spec, f"GPU count {rest!r} must be an integer >= 1")
    else:
        _fail(spec, f"unknown platform {platform!r}; use tpu or gpu, e.g. {EXAMPLES}")
    return platform, kind, rest


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:        # its parent package is not there
        return False


def check_compiler(spec: str) -> None:
    """A :class:`TargetError` when the compiler for ``spec`` is not installed (after :func:`parse`)."""
    platform = parse(spec)[0]
    if platform == "tpu":
        from moejax import libtpu_env
        if not libtpu_env.libtpu_installed():
            _fail(spec, 'needs libtpu, which is not installed: pip install -e ".[test]" (or "jax[tpu]==<your jax '
                        'version>")')
    elif not any(_module_exists(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                                            "jax_plugins.xla_cuda13")):
        _fail(spec, "needs jax's CUDA plugin, which is not installed: pip install -e \".[aot-gpu]\" "
                    "(about 5 GB; run with JAX_PLATFORMS=cpu on a machine without a GPU)")


def _first_line(err: Exception) -> str:
    """A compiler's refusal as one short line."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _tpu(spec: str, generation: str, topology: str) -> Target:
    # libtpu's environment on a host without a TPU was prepared when moejax was imported (moejax.libtpu_env).
    from jax.experimental import topologies
    name = f"{generation}:{topology}"
    try:
        devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # noqa: BLE001 - libtpu's refusal, as one line
        _fail(spec, f"libtpu cannot make topology {name!r} ({_first_line(err)})")
    kind, hbm, source = TPU_GENERATIONS[generation]
    chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
    per_chip = max(1, len(devices) // max(chips, 1))
    return Target(spec, "tpu", devices, devices[0].device_kind, hbm // per_chip, source, per_chip)


def _gpu(spec: str, kind: str, count: str) -> Target:
    import jax
    from jax.experimental import topologies
    if not jax.config.jax_platforms:
        # Without explicit platforms the CUDA plugin checks for a driver at jax's first device query and, finding none
        # on a CPU machine, is never registered, so no deviceless GPU topology can be made.
        _fail(spec, "set JAX_PLATFORMS=cpu for a GPU compile target on a machine without a GPU (python -m "
                    "moejax.aot sets it itself)")
    file, memory, source = GPU_KINDS[kind]
    config = (GPU_TARGETS_DIR / file).read_text()
    n = int(count)
    if n > 8 and n % 8:
        _fail(spec, f"GPU count {n}: more than one host's 8 GPUs must be a multiple of 8 (hosts of 8)")
    # <slices>x<hosts>x<GPUs per host>: up to 8 GPUs on one host, then hosts of 8.
    topology = f"1x1x{n}" if n <= 8 else f"1x{n // 8}x8"
    try:
        devices = tuple(topologies.get_topology_desc(platform="cuda", target_config=config,
                                                     topology=topology).devices)
    except Exception as err:  # noqa: BLE001 - the plugin's refusal, as one line
        _fail(spec, f"jax's CUDA plugin cannot make {n} x {kind} ({_first_line(err)})")
    return Target(spec, "gpu", devices, devices[0].device_kind, memory, source)


def make_target(spec: str) -> Target:
    """The :class:`Target` of ``--target=spec``: parsed, its compiler checked, its devices made."""
    platform, kind, rest = parse(spec)
    check_compiler(spec)
    return _tpu(spec, kind, rest) if platform == "tpu" else _gpu(spec, kind, rest)


__all__ = ["EXAMPLES", "GPU_KINDS", "TPU_GENERATIONS", "Target", "TargetError", "check_compiler",
           "make_target", "parse"]
