"""``train_and_evaluate``: the training loop behind ``python -m moejax.main``."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import parallel
from moejax.config import MoEConfig
from moejax.training import optim
from moejax.training.checkpoint import Checkpointer, prove_writable
from moejax.training.config import TrainConfig, legacy_router_fields, scheduled_moe_k, train_settings
from moejax.training import report
from moejax.training.metrics import MetricWriter, progress_bar
from moejax.training.profiling import ProfileWindow
from moejax.training.throughput import Throughput, Window
from moejax.training.steps import (NonFiniteError, TrainState, first_nonfinite, make_eval_step,
                                   make_train_step, split_batch)

log = logging.getLogger("moejax")

class _SigtermFlag:
    """A SIGTERM handler that records the signal; the trainer acts on it between steps. A second SIGTERM, while the
    first is still being acted on, ends the process at once as if no handler were installed: SIGTERM always works,
    even when a step or a save never returns."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        if self.set:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.set = True


def install_sigterm_handler() -> bool:
    """Installs the trainer's SIGTERM handler now (main thread only; idempotent); True if installed.

    :func:`train_and_evaluate` installs it as its first action. An entry point may call this earlier (before
    parsing a config, building data or importing heavy modules): a SIGTERM received from then on, before the
    trainer starts, is not lost but leads to the trainer's preemption path (checkpoint if there is state,
    ``preempted`` in the result, exit status 143 in ``moejax.main``).
    """
    if isinstance(signal.getsignal(signal.SIGTERM), _SigtermFlag):
        return True
    try:
        signal.signal(signal.SIGTERM, _SigtermFlag())
    except ValueError:          # not the main thread: leave signals alone
        return False
    return True


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[_SigtermFlag]:
    """The SIGTERM flag for one run: the handler already installed (kept), or a new one restored afterwards."""
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _SigtermFlag):
        yield current
        return
    flag = _SigtermFlag()
    try:
        signal.signal(signal.SIGTERM, flag)
    except ValueError:          # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, current)


def check_workdir(workdir: pathlib.Path) -> None:
    """Creates ``workdir`` if needed and proves it writable (a probe file, removed), before anything is loaded."""
    try:
        prove_writable(workdir)
    except OSError as err:
        raise ValueError(f"workdir={str(workdir)!r}: not a writable directory ({type(err).__name__}: "
                         f"{err.strerror or err})") from None


def build(config: Mapping[str, Any]):
    """(model, train batches, eval batches, data metadata), all validated before anything compiles."""
    from moejax import data as data_lib
    pipeline = data_lib.from_config(config["data"], jax.process_index(), jax.process_count())
    train_data, eval_data, meta = pipeline.train, pipeline.eval, pipeline.meta
    return experiment_model(config, meta), train_data, eval_data, meta


def experiment_model(config: Mapping[str, Any], meta: Any) -> nn.Module:
    """The model of an experiment config for data ``meta`` (a :class:`~moejax.data.DatasetMeta`), with the loss
    weights an older config still sets in ``train`` applied to every router (:func:`legacy_router_fields`)."""
    from moejax import models as models_lib
    cfg = models_lib.model_config(config["model"], num_classes=meta.num_classes, vocab_size=meta.vocab_size,
                                  input_shape=meta.input_shape)
    cfg = models_lib.with_router_fields(cfg, legacy_router_fields(train_settings(config)))
    return models_lib.build_model(cfg)


def init_fn(model: nn.Module, tx, example_inputs: jax.Array, boxed: bool):
    """key -> TrainState; with ``boxed`` the parameters (and optimiser state) keep flax's logical-axis boxes."""

    def init(key: jax.Array) -> TrainState:
        init_key, run_key = jax.random.split(key)
        variables = dict(model.init({"params": init_key, "dropout": init_key, "jitter": init_key}, example_inputs,
                                    deterministic=True))
        params = variables.pop("params")
        if not boxed:
            params, variables = nn.unbox(params), nn.unbox(variables)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          moe_state=variables, rng=jax.random.key_data(run_key))

    return init


def init_state(model: nn.Module, tx, example_inputs: jax.Array, seed: int, mesh: Mesh | None = None,
               rules: Any = ()) -> tuple[TrainState, Any]:
    """(train state, its shardings): parameters and optimiser state sharded over ``mesh`` by their logical axes.

    Without a mesh, everything is on the default device (shardings None). Call inside ``jax.set_mesh(mesh)``
    and ``nn.logical_axis_rules(rules)`` so that expert-parallel layers see the mesh while tracing.
    """
    key = jax.random.key(seed)
    if mesh is None:
        return jax.jit(init_fn(model, tx, example_inputs, boxed=False))(key), None
    abstract = jax.eval_shape(init_fn(model, tx, example_inputs, boxed=True), key)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    for line in parallel.describe(shardings):
        log.debug("moejax: sharding %s", line)
    return jax.jit(init_fn(model, tx, example_inputs, boxed=False), out_shardings=shardings)(key), shardings


def jit_train_step(model: nn.Module, tx, task: str, settings: TrainConfig, moe_k: int | None,
                   state_sharding: Any, mesh: Mesh):
    """The trainer's jitted train step ``(state, batch) -> (state, metrics)`` at experts-per-token ``moe_k``: the
    state sharded as ``state_sharding``, the batch along the mesh's token axes, metrics replicated. The one place it
    is built, so that :mod:`moejax.aot` compiles exactly what the trainer runs."""
    return jax.jit(make_train_step(model, tx, task, moe_k=moe_k, objective=settings.objective),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())))


def state_dict(state: TrainState) -> dict[str, Any]:
    """The train state as the dict a checkpoint holds."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "moe_state": state.moe_state, "rng": state.rng}


def _state_from_dict(d: Mapping[str, Any], like: TrainState) -> TrainState:
    restored = TrainState(**d)
    if jax.tree_util.tree_structure(restored) != jax.tree_util.tree_structure(like):
        raise ValueError("checkpoint: restored train state does not have the structure of this config's state")
    return restored


def evaluate(eval_fn, state: TrainState, eval_data, task: str, max_batches: int | None,
             sharding: NamedSharding | None = None) -> dict[str, Any]:
    """Loss, accuracy (or perplexity) and per-layer routing statistics over the eval split.

    The per-layer statistics are averaged over eval batches, padding rows of the last batch included.
    """
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
    loads, dropped, n = None, None, 0
    for i, batch in enumerate(eval_data):
        if max_batches is not None and i >= max_batches:
            break
        out = eval_fn(state, batch if sharding is None else _put_batch(batch, sharding))
        for k in totals:
            totals[k] += float(out[k])
        lb = [np.asarray(x) for x in out["expert_load"]]
        dr = [float(x) for x in out["dropped_fraction"]]
        loads = lb if loads is None else [a + b for a, b in zip(loads, lb)]
        dropped = dr if dropped is None else [a + b for a, b in zip(dropped, dr)]
        n += 1
    count = max(totals["count"], 1.0)
    result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct_sum"] / count,
              "examples": totals["count"]}
    if task == "lm":
        result["perplexity"] = float(np.exp(result["loss"]))
    if n:
        result["expert_load"] = [x / n for x in loads]
        result["dropped_fraction"] = [x / n for x in dropped]
    return result


def check_model_on_mesh(model: nn.Module, mesh: Mesh) -> None:
    """Rejects, before compiling, MoE layers that cannot be split over ``mesh`` (errors name the field)."""
    cfg = getattr(model, "config", None)
    specs = cfg.ffn_specs() if hasattr(cfg, "ffn_specs") else ()
    n_exp = mesh.shape.get("expert", 1)
    shards = parallel.token_shards(mesh)
    for i, spec in enumerate(specs):
        if not isinstance(spec, MoEConfig):
            continue
        if spec.num_experts % n_exp:
            raise ValueError(f"model layer {i}: num_experts={spec.num_experts} must be divisible by mesh.expert={n_exp}")
        if n_exp > 1 and spec.dispatch.mode == "capacity" and spec.dispatch.groups % shards:
            raise ValueError(f"model layer {i}: dispatch.groups={spec.dispatch.groups}: capacity dispatch with expert "
                             f"parallelism needs routing groups divisible by the {shards} token shards "
                             f"(data*fsdp*expert); set dispatch.groups={shards} (or a multiple)")
        if n_exp > 1 and "token_choice" not in spec.router.options.offers:
            raise ValueError(f"model layer {i}: router.kind={spec.router.kind!r} is not supported with mesh.expert > 1 "
                             "(an expert-choice router picks tokens across all devices)")


def check_eval_shape(model: nn.Module, example: jax.Array, eval_batch: int) -> None:
    """Traces (does not compile) the model on the evaluation batch shape, so that a shape error of the evaluation
    (e.g. ``dispatch.groups`` not dividing its tokens) stops the run before training instead of at the first
    evaluation; the training shape is traced by :func:`init_state` right after."""
    if eval_batch == example.shape[0]:
        return
    x = jax.ShapeDtypeStruct((eval_batch, *example.shape[1:]), example.dtype)
    key = jax.random.key(0)
    try:
        jax.eval_shape(lambda xx: model.init({"params": key, "dropout": key, "jitter": key}, xx, deterministic=True),
                       x)
    except ValueError as e:
        raise ValueError(f"{e} (with the evaluation batch: data.eval_batch_size={eval_batch})") from None


def _check_divisible(config: Mapping[str, Any], mesh: Mesh) -> None:
    n = parallel.token_shards(mesh)
    for field in ("batch_size", "eval_batch_size"):
        value = config["data"][field] if field in config["data"] else None
        if value is not None and value % n:
            raise ValueError(f"data.{field}={value}: must be divisible by the {n} token shards of the mesh "
                             f"(data*fsdp*expert)")


def _put_batch(batch: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded along ``data``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train_and_evaluate(config: Mapping[str, Any], workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest good checkpoint; returns the final eval.

    The returned dict has the final evaluation metrics plus ``step`` and ``preempted`` (True when a SIGTERM
    stopped the run after saving a checkpoint: SIGTERM is handled from this function's first line on, so one
    received while loading data or restoring also ends here, with a checkpoint of the state at hand).

    Order of work: the SIGTERM handler; the config checks that need nothing loaded (``train``, ``optimizer``,
    ``data`` fields; one-line ``ValueError`` naming the field); the workdir (created and proven writable); the
    mesh; data (dataset-size checks) and model; the restore; then the first compilation of a train step.

    Raises:
      ValueError: a bad config field or an unwritable workdir (before any data is read), or
        ``CheckpointMismatchError`` (a ``ValueError``) when the workdir's checkpoint is of another model.
      NoUsableCheckpointError: the workdir held checkpoints but none could be restored (they were moved to
        ``workdir/corrupt_checkpoints/``); the run does not start over at step 0.
      NonFiniteError: a step's loss, gradient or updated state was not finite (the update was not applied and
        the last checkpoint is good), or the checkpoint to resume from holds non-finite values.
    """
    with _sigterm_flag() as sigterm:     # first: a SIGTERM during start-up is not lost
        settings = train_settings(config)
        total = settings.steps
        optim.validate(config.get("optimizer", {}), total)
        from moejax.data import DataConfig
        DataConfig.from_dict(config["data"])       # data fields, before any data is read
        workdir = pathlib.Path(workdir)
        check_workdir(workdir)
        with _mesh_context(config) as (mesh, rules):
            return _train(config, workdir, settings, mesh, rules, sigterm)


@contextlib.contextmanager
def _mesh_context(config: Mapping[str, Any]) -> Iterator[tuple[Mesh, Any]]:
    """The config's mesh (joining other processes first if asked) and rules, entered for tracing: (mesh, rules)."""
    mesh_cfg = parallel.MeshConfig.from_dict(config.get("mesh"))
    parallel.maybe_initialize(mesh_cfg)
    mesh = parallel.make_mesh(mesh_cfg)
    rules = mesh_cfg.all_rules()
    _check_divisible(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh, rules


class _Setup(NamedTuple):
    """What :func:`_model_and_state` builds for a config."""

    model: nn.Module
    train_data: Any
    eval_data: Any
    meta: Any
    tx: Any
    state: TrainState            # fresh, sharded
    state_sharding: Any
    example: jax.Array           # zeros shaped like the global training input


def _model_and_state(config: Mapping[str, Any], total_steps: int, mesh: Mesh, rules: Any) -> _Setup:
    """The model, data, optimiser and a fresh sharded train state for ``config``."""
    model, train_data, eval_data, meta = build(config)
    check_model_on_mesh(model, mesh)
    tx = optim.make_optimizer(config.get("optimizer", {}), total_steps)
    example_inputs, _ = split_batch(train_data.batch(0), meta.task)
    # The global batch shape (this process holds 1/process_count of it): expert-parallel layers trace with it.
    example = jnp.zeros((np.shape(example_inputs)[0] * jax.process_count(), *np.shape(example_inputs)[1:]),
                        np.asarray(example_inputs).dtype)
    eval_batch = int(config["data"].get("eval_batch_size") or example.shape[0])     # global, like example
    check_eval_shape(model, example, eval_batch)
    state, state_sharding = init_state(model, tx, example, int(config.get("seed", 0)), mesh, rules)
    return _Setup(model, train_data, eval_data, meta, tx, state, state_sharding, example)


def initial_state(config: Mapping[str, Any]) -> TrainState:
    """The step-0 train state :func:`train_and_evaluate` builds for ``config`` (the same mesh context, seed split
    and initialisers: the exact starting point of a run), on the host. For untrained controls and tools that
    need a config's state without training it."""
    settings = train_settings(config)
    with _mesh_context(config) as (mesh, rules):
        return jax.device_get(_model_and_state(config, settings.steps, mesh, rules).state)


def _nonfinite_message(step: int, metrics: Mapping[str, Any], state: TrainState, ckpt: Checkpointer) -> str:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    leaf = first_nonfinite(state, metrics["state_finite"])
    if np.isfinite(loss) and np.isfinite(grad_norm):
        what = f"the update made the train state non-finite (first: {leaf})"
    else:
        what = f"non-finite loss ({loss}) or gradient norm ({grad_norm})"
        if leaf is not None:
            what += f", and the updated state (first: {leaf})"
    ckpt.wait()
    good = ckpt.steps()
    return (f"step {step}: {what}; the update was not applied and the run stops. "
            f"Last good checkpoint: {good[-1] if good else 'none'} in {ckpt.directory}")


def _train(config: Mapping[str, Any], workdir: pathlib.Path, settings: TrainConfig, mesh: Mesh,
           rules: Any, sigterm: _SigtermFlag) -> dict[str, Any]:
    total = settings.steps
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = parallel.batch_sharding(mesh)
    model, train_data, eval_data, meta, tx, state, state_sharding, example = _model_and_state(
        config, total, mesh, rules)
    task = meta.task
    lead = jax.process_index() == 0

    ckpt = Checkpointer(workdir, keep=settings.keep_checkpoints, async_save=settings.async_checkpoints)
    writer = bar = None
    profile = ProfileWindow(workdir, settings.profile_steps)
    throughput = Throughput(getattr(model, "config", None), example.shape, peak_tflops=settings.peak_tflops)
    try:
        # Raises, moving nothing, for a checkpoint of another model; never starts over when checkpoints were
        # found but none could be used.
        restored = ckpt.restore_latest(state_dict(state))
        if restored is not None:
            state = _state_from_dict(restored[0], state)
            log.info("moejax: resumed from step %d in %s", restored[1], ckpt.directory)
        start = int(state.step)
        if lead:
            (workdir / "config.json").write_text(json.dumps(to_jsonable(config), indent=2, sort_keys=True))
            for line in report.header_lines(report.config_digest(to_jsonable(config)), model, example, state.params,
                                            mesh, start, total):
                print(line, flush=True)
            print(throughput.describe(), flush=True)
        writer = MetricWriter(workdir, tensorboard=settings.tensorboard, enabled=lead)
        writer.truncate_after(start)        # records of steps past the restored one would appear twice
        if sigterm.set:
            # SIGTERM during start-up: nothing is compiled for training; checkpoint the state we have.
            ckpt.save(start, state_dict(state))
            ckpt.wait()
            log.warning("moejax: SIGTERM during start-up: checkpoint at step %d, exiting", start)
            return {"step": start, "preempted": True}

        # k is a static shape: one jitted train step per distinct scheduled k (SMoE-Dropout), built on first use.
        train_steps: dict[int | None, Any] = {}

        def train_step_at(step: int):
            k = scheduled_moe_k(settings, step)
            if k not in train_steps:
                train_steps[k] = jit_train_step(model, tx, task, settings, k, state_sharding, mesh)
            return train_steps[k]

        eval_step = jax.jit(make_eval_step(model, task, moe_k=settings.eval_moe_k),
                            in_shardings=(state_sharding, batch_sharding), out_shardings=replicated)
        bar = progress_bar(total, start)
        emit = report.printer(bar, lead)
        window = Window()
        for step in range(start, total):
            batch = _put_batch(train_data.batch(step), batch_sharding)
            compiles, t0 = len(train_steps), time.perf_counter()
            profile.before_step(step)
            state, metrics = train_step_at(step)(state, batch)
            # The one host sync per step: the step's finiteness (loss, gradient and the updated state).
            if not int(metrics["finite"]):
                raise NonFiniteError(_nonfinite_message(step, metrics, state, ckpt))
            done = step + 1
            profile.after_step(done, state)
            examples = int(np.shape(batch["tokens" if task == "lm" else "labels"])[0])
            window.add(examples, examples * throughput.tokens_per_example, compiled=len(train_steps) != compiles,
                       seconds=time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if done % settings.log_every == 0 or done == total:
                record = {k: v for k, v in metrics.items() if k not in ("finite", "state_finite")}
                record.update(throughput.record(window, metrics.get("experts_per_token")))
                emit(report.train_line(done, total, writer.write(done, "train", record), task))
                window.reset()
            if done % settings.eval_every == 0 and done != total:
                with window.paused():
                    emit(report.eval_line(done, writer.write(done, "eval", evaluate(
                        eval_step, state, eval_data, task, settings.eval_steps, batch_sharding)), task))
            if done % settings.checkpoint_every == 0 or done == total:
                ckpt.save(done, state_dict(state))
            if sigterm.set and done != total:
                ckpt.save(done, state_dict(state))
                ckpt.wait()
                log.warning("moejax: SIGTERM: saved checkpoint at step %d, exiting", done)
                return {"step": int(state.step), "preempted": True}
        ckpt.wait()
        final = evaluate(eval_step, state, eval_data, task, settings.eval_steps, batch_sharding)
        emit(report.eval_line(int(state.step), writer.write(int(state.step), "eval", final), task))
        return {**final, "step": int(state.step), "preempted": False}
    finally:
        profile.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()


def evaluate_at_k(config: Mapping[str, Any], workdir: str | pathlib.Path, ks: Sequence[int | None], *,
                  max_batches: int | None = None) -> dict[int | None, dict[str, Any]]:
    """Evaluates the newest checkpoint in ``workdir`` (trained with ``config``) at each inference ``k`` of ``ks``.

    SMoE-Dropout's inference-time sweep: ``k`` is passed as the model's ``moe_k`` (every routed MoE layer uses
    ``min(k, its number of experts)``; None: each layer's ``router.k``). Returns ``{k: metrics}`` with the
    metrics of :func:`evaluate` plus ``step`` (of the checkpoint) and ``moe_k``, over at most ``max_batches``
    eval batches (None: ``train.eval_steps``). One compilation per ``k``; nothing is trained or written.
    Raises ``ValueError`` naming ``ks`` for a k that is not None or an int >= 1, ``FileNotFoundError`` when
    ``workdir`` has no checkpoint.
    """
    for k in ks:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"ks: {k!r} is not None or an int >= 1")
    settings = train_settings(config)
    with _mesh_context(config) as (mesh, rules):
        setup = _model_and_state(config, settings.steps, mesh, rules)
        model, eval_data, meta, state, state_sharding = (setup.model, setup.eval_data, setup.meta, setup.state,
                                                         setup.state_sharding)
        ckpt = Checkpointer(pathlib.Path(workdir), keep=settings.keep_checkpoints, async_save=False)
        try:
            restored = ckpt.restore_latest(state_dict(state))
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"workdir: no checkpoint to evaluate in {ckpt.directory}")
        state = _state_from_dict(restored[0], state)
        batch_sharding = parallel.batch_sharding(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        batches = settings.eval_steps if max_batches is None else max_batches
        results: dict[int | None, dict[str, Any]] = {}
        for k in ks:
            eval_step = jax.jit(make_eval_step(model, meta.task, moe_k=k),
                                in_shardings=(state_sharding, batch_sharding), out_shardings=replicated)
            results[k] = {**evaluate(eval_step, state, eval_data, meta.task, batches, batch_sharding),
                          "step": restored[1], "moe_k": k}
    return results


def to_jsonable(config: Any) -> Any:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(k): to_jsonable(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_jsonable(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return repr(config)
