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
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import parallel
from moejax.aot import analysis
from moejax.aot.targets import Target
from moejax.config import MoEConfig
from moejax.models.build import count_params
from moejax.training import loop, optim
from moejax.training.config import scheduled_moe_k, train_settings


class DoesNotFit(Exception):
    """The compiler itself refused the program for the target's memory (the TPU compiler does, with its numbers)."""


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's report (per device unless said otherwise).

    name: ``train_step``, ``prefill`` or ``decode``. memory: :class:`~moejax.aot.analysis.Memory`. state_bytes:
    what stays resident, one device's shard: the train state (parameters + optimiser state + the rest), or for
    generation the variables and the KV cache. cost: the compiler's cost
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """The config's mesh on the target's devices and the logical-axis rules that shard on it."""

    mesh: Mesh
    rules: Any

    @classmethod
    def of(cls, config: Mapping[str, Any], target: Target) -> "Layout":
        mesh_cfg = parallel.MeshConfig.from_dict(config.get("mesh"))
        mesh = parallel.make_mesh(dataclasses.replace(mesh_cfg, num_devices=None, distributed="never"),
                                  target.devices)
        return cls(mesh, mesh_cfg.all_rules())


def _compile(name: str, lower: Callable[[], Any], state_bytes: int, target: Target, layout: Layout) -> Program:
    """Lowers (under the layout's mesh and rules) and compiles one program for ``target``; :class:`DoesNotFit` when
    the compiler refuses it for memory."""
    t0 = time.perf_counter()
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        lowered = lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit in HBM
        text = str(err)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            line = next((x.strip() for x in text.splitlines() if "memory" in x.lower()), text.splitlines()[0])
            raise DoesNotFit(f"{name}: {line[:400]}") from None
        raise
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    return Program(name, analysis.Memory.of(compiled), state_bytes, analysis.cost(compiled),
                   analysis.collectives(hlo), analysis.kernel_calls(hlo, target.platform), t1 - t0, t2 - t1)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_train(config: Mapping[str, Any], target: Target, model: nn.Module | None = None
                  ) -> tuple[Program, Backends, dict[str, Any]]:
    """Compiles the config's train step (at the first step's experts per token) for ``target``.

    ``model``: train this model instead of the config's ``model`` (e.g. a pretrained architecture,
    :func:`moejax.aot.pretrained.model`; the config still gives data shapes, optimiser and mesh). Returns (the
    program's report, the dispatch backends, facts for the report: model, batch shape, mesh shape, parameter
    count). Raises ``ValueError`` naming the field for a config that cannot be laid out
    on the target's devices (mesh axes, divisibility), before compiling.
    """
    settings = train_settings(config)
    optim.validate(config.get("optimizer", {}), settings.steps)
    layout = Layout.of(config, target)
    mesh = layout.mesh
    loop._check_divisible(config, mesh)
    meta, batch, example = data_shapes(config)
    if model is None:
        model = loop.experiment_model(config, meta)
    loop.check_model_on_mesh(model, mesh)
    tx = optim.make_optimizer(config.get("optimizer", {}), settings.steps)
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.rules):
        boxed = jax.eval_shape(lambda k, x: loop.init_fn(model, tx, x, boxed=True)(k), key, example)
        shardings = parallel.state_shardings(boxed, mesh, layout.rules)
        plain = jax.eval_shape(lambda k, x: loop.init_fn(model, tx, x, boxed=False)(k), key, example)
    state = _with_shardings(plain, shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
    step = loop.jit_train_step(model, tx, meta.task, settings, scheduled_moe_k(settings, 0), shardings, mesh)
    program = _compile("train_step", lambda: step.lower(state, batch), _shard_bytes(state), target, layout)
    facts = {"model": model, "meta": meta, "input_shape": tuple(example.shape),
             "mesh": {a: int(s) for a, s in mesh.shape.items()}, "params": count_params(plain.params)}
    return program, dispatch_backends(model, target.platform), facts


def abstract_variables(model: nn.Module, layout: Layout) -> dict[str, Any]:
    """A language model's variables (``params`` and its other collections) as ShapeDtypeStructs sharded by the
    layout's rules (what :func:`moejax.hf.load` places on a mesh); nothing is allocated."""
    rows = parallel.token_shards(layout.mesh)            # one token per shard: expert-parallel layers split them
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((rows, 1), jnp.int32)))
        shardings = parallel.state_shardings(boxed, layout.mesh, layout.rules)
    plain = nn.meta.unbox(boxed)
    return _with_shardings(plain, shardings)


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """A KV cache split like the tokens: each array's batch axis over the mesh's token axes (when they divide it),
    a ``[B, S, H, Dh]`` array's heads over ``tensor`` (when it divides them); the rest replicated."""
    token_axes = tuple(a for a in parallel.TOKEN_AXES if a in mesh.axis_names)
    shards = parallel.token_shards(mesh)
    tensor = mesh.shape.get("tensor", 1)

    def one(leaf: Any) -> NamedSharding:
        spec: list[Any] = [None] * len(leaf.shape)
        if spec and shards > 1 and leaf.shape[0] % shards == 0:
            spec[0] = token_axes
        if len(spec) == 4 and tensor > 1 and leaf.shape[2] % tensor == 0:
            spec[2] = "tensor"
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(one, cache)


@dataclasses.dataclass(frozen=True)
class Generation:
    """The shapes the generation programs are compiled at: ``batch`` sequences, prompts of ``prompt_len`` tokens,
    ``new_tokens`` generated (the KV cache holds ``prompt_len + new_tokens`` slots)."""

    batch: int
    prompt_len: int
    new_tokens: int

    def check(self, mesh: Mesh) -> None:
        for field in ("batch", "prompt_len", "new_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--gen_{field}={value!r}: must be an integer >= 1")
        shards = parallel.token_shards(mesh)
        if self.batch % shards:
            raise ValueError(f"--gen_batch={self.batch}: must be divisible by the {shards} token shards of the mesh "
                             f"(data*fsdp*expert)")


def compile_generate(model: nn.Module, variables: Any, target: Target, layout: Layout, gen: Generation,
                     programs: Sequence[str] = ("prefill", "decode")) -> list[Program]:
    """Compiles generation's two programs for ``target`` (what :func:`moejax.generation.generate` runs, MoE layers
    dropless): ``prefill``, the left-padded prompts ``int32[B, P]`` written into an empty cache of ``P + N`` slots,
    returning the last position's logits ``float32[B, V]``; and ``decode``, one new token per sequence against a
    cache of ``P + N`` slots. The cache is donated to both (generation updates it in place). ``variables``: the
    model's abstract variables with shardings (:func:`abstract_variables`)."""
    from moejax.generation.decode import cached_forward, for_decoding
    from moejax.models.transformer import make_cache
    gen.check(layout.mesh)
    cfg = for_decoding(model.config)
    loop.check_model_on_mesh(type(model)(cfg), layout.mesh)
    call = cached_forward(cfg, tuple(variables))
    b, p, slots = gen.batch, gen.prompt_len, gen.prompt_len + gen.new_tokens
    mesh = layout.mesh
    cache = jax.eval_shape(lambda: make_cache(cfg, b, slots))
    cache_sharding = cache_shardings(cache, mesh)
    cache = _with_shardings(cache, cache_sharding)
    rows = parallel.batch_sharding(mesh)                # gen.check: the batch splits over the token shards
    replicated = NamedSharding(mesh, PartitionSpec())

    def last_logits(variables, tokens, positions, mask, cache):
        logits, cache = call(variables, tokens, positions, mask, cache)
        return logits[:, -1], cache

    fn = jax.jit(last_logits, donate_argnums=(4,),
                 out_shardings=(replicated, cache_sharding))
    state_bytes = _shard_bytes(variables)
    compiled = []
    for name, length in (("prefill", p), ("decode", 1)):
        if name not in programs:
            continue
        tokens = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=rows)
        mask = jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=rows)
        compiled.append(_compile(name, lambda t=tokens, m=mask: fn.lower(variables, t, t, m, cache),
                                 state_bytes + _shard_bytes(cache), target, layout))
    return compiled


def params_count(model: nn.Module, example: jax.ShapeDtypeStruct) -> int:
    """Parameters of ``model`` for inputs like ``example`` (shapes only)."""
    tree = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), example)
    return count_params(tree["params"])


__all__ = ["Backends", "DoesNotFit", "Generation", "Layout", "Program", "abstract_variables", "cache_shardings",
           "compile_generate", "compile_train", "data_shapes", "dispatch_backends", "params_count"]
