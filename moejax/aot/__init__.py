"""Ahead-of-time compilation for TPU topologies and NVIDIA GPUs from a CPU machine (``python -m moejax.aot``).

:mod:`moejax.aot.targets` makes a target's compile-only devices, :mod:`moejax.aot.compile` compiles a config's train
step on them from abstract shapes, :mod:`moejax.aot.analysis` reads memory, FLOPs, collectives and kernel calls off
the compiled program. ``docs/accelerator.md`` has the commands and the measured tables.
"""
from moejax.aot.targets import Target, TargetError, make_target, parse

__all__ = ["Target", "TargetError", "make_target", "parse"]
