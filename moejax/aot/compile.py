"""Compile a config's train step for a target from abstract shapes, and report what the compiler says about it.

:func:`compile_train` builds exactly what :func:`moejax.training.loop.train_and_evaluate` compiles (the model, the
optimiser, the train state sharded by the config's mesh and rules, :func:`moejax.training.loop.jit_train_step`),
but with every array a ``jax.ShapeDtypeStruct`` on the target's devices: nothing the size of the model is allocated
on the host, and no data is read for a language-model config (the batch shape is ``data.batch_size`` x
``data.seq_len``). Dispatch backends are selected for the target's platform (the context mesh's devices,
:func:`moejax.dispatch.backends.registry.current_platform`), so a TPU compile runs the TPU kernels.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import parallel
from moejax.aot import analysis
from moejax.aot.targets import Target
from moejax.config import MoEConfig
from moejax.training import loop, optim
from moejax.training.config import scheduled_moe_k, train_settings


class DoesNotFit(Exception):
    """The compiler itself refused the program for the target's memory (the TPU compiler does, with its numbers)."""


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's report (per device unless said otherwise).

    name: ``train_step`` (or ``prefill``/``decode``). memory: :class:`~moejax.aot.analysis.Memory`. state_bytes:
    the train state's shard on one device (parameters + optimiser state + the rest). cost: the compiler's cost
    analysis ({} on GPU). collectives: ``{op: {count, bytes}}``. kernel_calls: compiled Pallas kernel calls in the
    optimised HLO. lower_seconds, compile_seconds: wall time on this host.
    """

    name: str
    memory: analysis.Memory
    state_bytes: int
    cost: dict[str, float]
    collectives: dict[str, dict[str, int]]
    kernel_calls: int
    lower_seconds: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class Backends:
    """What each routed MoE layer's dispatch runs on the target: ``[(layer, mode, backend, interpreted)]``."""

    layers: tuple[tuple[int, str, str, bool], ...]


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def data_shapes(config: Mapping[str, Any]) -> tuple[Any, dict[str, jax.ShapeDtypeStruct], Any]:
    """(dataset metadata, the global batch as ShapeDtypeStructs, example model input ShapeDtypeStruct).

    A language-model config reads nothing (shapes from ``data.batch_size`` and ``data.seq_len``, the byte
    vocabulary); a classification config reads its dataset's metadata and first batch (the shipped datasets are
    built offline)."""
    from moejax import data as data_lib
    cfg = data_lib.DataConfig.from_dict(config["data"])
    spec = cfg.spec
    if spec.task == "lm":
        from moejax.data.lm import VOCAB_SIZE
        from moejax.data.pipeline import DatasetMeta
        meta = DatasetMeta(cfg.name, "lm", None, (cfg.seq_len,), VOCAB_SIZE, 0, 0)
        batch = {"tokens": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)}
        return meta, batch, jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    pipeline = data_lib.from_config(cfg)
    host = pipeline.train.batch(0)
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in host.items()}
    inputs = batch["inputs"]
    return pipeline.meta, batch, inputs


def dispatch_backends(model: nn.Module, platform: str) -> Backends:
    """The grouped-matmul / capacity backend each routed layer selects on ``platform`` (``dispatch.gmm=auto``
    resolved), and whether it would run in the Pallas interpreter."""
    from moejax.dispatch.backends import CAPACITY, GMM
    cfg = getattr(model, "config", None)
    specs = cfg.ffn_specs() if hasattr(cfg, "ffn_specs") else ()
    rows = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, MoEConfig):
            continue
        d = spec.dispatch
        if d.mode == "capacity":
            b = CAPACITY.resolve(d.capacity_impl, platform)
        else:
            b = GMM.resolve(d.gmm, platform)
        rows.append((i, d.mode, b.name, b.interpreted(platform)))
    return Backends(tuple(rows))


def compile_train(config: Mapping[str, Any], target: Target) -> tuple[Program, Backends, dict[str, Any]]:
    """Compiles the config's train step (at the first step's experts per token) for ``target``.

    Returns (the program's report, the dispatch backends, facts for the report: model, batch shape, mesh shape,
    analytic FLOPs per step). Raises ``ValueError`` naming the field for a config that cannot be laid out on the
    target's devices (mesh axes, divisibility), before compiling.
    """
    settings = train_settings(config)
    optim.validate(config.get("optimizer", {}), settings["steps"])
    mesh_cfg = parallel.MeshConfig.from_dict(config.get("mesh"))
    mesh = parallel.make_mesh(dataclasses.replace(mesh_cfg, num_devices=None, distributed="never"), target.devices)
    rules = mesh_cfg.all_rules()
    loop._check_divisible(config, mesh)
    meta, batch, example = data_shapes(config)
    from moejax import models as models_lib
    model = models_lib.build_model(config["model"], num_classes=meta.num_classes, vocab_size=meta.vocab_size,
                                   input_shape=meta.input_shape)
    loop.check_model_on_mesh(model, mesh)
    tx = optim.make_optimizer(config.get("optimizer", {}), settings["steps"])
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda k, x: loop.init_fn(model, tx, x, boxed=True)(k), key, example)
        shardings = parallel.state_shardings(boxed, mesh, rules)
        plain = jax.eval_shape(lambda k, x: loop.init_fn(model, tx, x, boxed=False)(k), key, example)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), plain, shardings)
        batch_sharding = parallel.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
        step = loop.jit_train_step(model, tx, meta.task, settings, scheduled_moe_k(settings, 0), shardings, mesh)
        lowered = step.lower(state, batch)
        backends = dispatch_backends(model, target.platform)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit in HBM
        text = str(err)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            line = next((x.strip() for x in text.splitlines() if "memory" in x.lower()), text.splitlines()[0])
            raise DoesNotFit(line[:400]) from None
        raise
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    program = Program("train_step", analysis.Memory.of(compiled), _shard_bytes(state), analysis.cost(compiled),
                      analysis.collectives(hlo), analysis.kernel_calls(hlo, target.platform), t1 - t0, t2 - t1)
    facts = {"model": model, "meta": meta, "input_shape": tuple(example.shape),
             "mesh": {a: int(s) for a, s in mesh.shape.items()}, "params": _params_count(plain.params)}
    return program, backends, facts


def _params_count(params: Any) -> int:
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(params)))


__all__ = ["Backends", "DoesNotFit", "Program", "compile_train", "data_shapes", "dispatch_backends"]
