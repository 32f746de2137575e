"""``train_and_evaluate``: the training loop behind ``python -m moejax.main``."""
from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import time
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.training import optim
from moejax.training.checkpoint import Checkpointer
from moejax.training.config import train_settings
from moejax.training.metrics import MetricWriter, progress_bar, to_python
from moejax.training.steps import AuxWeights, TrainState, make_eval_step, make_train_step, split_batch

log = logging.getLogger("moejax")


class NonFiniteError(FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient; the state was not updated."""


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    """Turns SIGTERM into a flag the loop checks after each step (only possible on the main thread)."""
    flag = {"set": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def build(config: Mapping[str, Any]):
    """(model, train batches, eval batches, data metadata), all validated before anything compiles."""
    from moejax import data as data_lib
    from moejax import models as models_lib
    pipeline = data_lib.from_config(config["data"], jax.process_index(), jax.process_count())
    train_data, eval_data, meta = pipeline.train, pipeline.eval, pipeline.meta
    model = models_lib.build_model(config["model"], num_classes=meta.num_classes, vocab_size=meta.vocab_size,
                                   input_shape=meta.input_shape)
    return model, train_data, eval_data, meta


def init_state(model: nn.Module, tx, example_inputs: jax.Array, seed: int) -> TrainState:
    key = jax.random.key(seed)
    init_key, run_key = jax.random.split(key)

    @jax.jit
    def init(k):
        return nn.unbox(model.init({"params": k, "dropout": k, "jitter": k}, example_inputs, deterministic=True))

    variables = dict(init(init_key))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      moe_state=variables, rng=jax.random.key_data(run_key))


def _state_dict(state: TrainState) -> dict[str, Any]:
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


def data_mesh() -> Mesh:
    """All devices on one ``data`` axis: batches are split over it, the train state is replicated."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def _check_divisible(config: Mapping[str, Any], mesh: Mesh) -> None:
    n = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        value = config["data"][field] if field in config["data"] else None
        if value is not None and value % n:
            raise ValueError(f"data.{field}={value}: must be divisible by the {n} devices of the data axis")


def _put_batch(batch: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded along ``data``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _items_per_step(batch: Mapping[str, Any], task: str) -> int:
    if task == "lm":
        b, l1 = batch["tokens"].shape
        return b * (l1 - 1)
    return int(np.asarray(batch["labels"]).shape[0])


def train_and_evaluate(config: Mapping[str, Any], workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest good checkpoint; returns the final eval.

    The returned dict has the final evaluation metrics plus ``step`` and ``preempted`` (True when a SIGTERM
    stopped the run after saving a checkpoint).
    """
    settings = train_settings(config)
    total = settings["steps"]
    optim.validate(config.get("optimizer", {}), total)
    mesh = data_mesh()
    _check_divisible(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model, train_data, eval_data, meta = build(config)
    task = meta.task
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(to_jsonable(config), indent=2, sort_keys=True))

    tx = optim.make_optimizer(config.get("optimizer", {}), total)
    example_inputs, _ = split_batch(train_data.batch(0), task)
    state = jax.device_put(init_state(model, tx, jnp.asarray(example_inputs), int(config.get("seed", 0))), replicated)
    ckpt = Checkpointer(workdir, keep=settings["keep_checkpoints"], async_save=settings["async_checkpoints"])
    writer = MetricWriter(workdir, tensorboard=settings["tensorboard"])
    restored = ckpt.restore_latest(_state_dict(state))
    if restored is not None:
        state = _state_from_dict(restored[0], state)
        writer.truncate_after(restored[1])
        log.info("moejax: resumed from step %d in %s", restored[1], ckpt.directory)
    start = int(state.step)

    weights = AuxWeights(settings["load_balance_weight"], settings["z_loss_weight"], settings["importance_weight"])
    train_step = jax.jit(make_train_step(model, tx, task, weights), in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(model, task), in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated)
    bar = progress_bar(total, start)
    preempted = False
    window_start, window_items = time.perf_counter(), 0
    try:
        with _sigterm_flag() as sigterm:
            for step in range(start, total):
                batch = _put_batch(train_data.batch(step), batch_sharding)
                state, metrics = train_step(state, batch)
                if not int(metrics["finite"]):
                    ckpt.wait()
                    good = ckpt.steps()
                    raise NonFiniteError(
                        f"step {step}: non-finite loss ({float(metrics['loss'])}) or gradient norm "
                        f"({float(metrics['grad_norm'])}); the update was not applied and the run stops. "
                        f"Last good checkpoint: {good[-1] if good else 'none'} in {ckpt.directory}")
                window_items += _items_per_step(batch, task)
                done = step + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                if done % settings["log_every"] == 0 or done == total:
                    elapsed = time.perf_counter() - window_start
                    record = {k: v for k, v in metrics.items() if k != "finite"}
                    record["items_per_sec"] = window_items / max(elapsed, 1e-9)
                    writer.write(done, "train", record)
                    window_start, window_items = time.perf_counter(), 0
                if done % settings["eval_every"] == 0 and done != total:
                    writer.write(done, "eval", evaluate(eval_step, state, eval_data, task, settings["eval_steps"],
                                                        batch_sharding))
                if done % settings["checkpoint_every"] == 0 or done == total:
                    ckpt.save(done, _state_dict(state))
                if sigterm["set"] and done != total:
                    ckpt.save(done, _state_dict(state))
                    ckpt.wait()
                    log.warning("moejax: SIGTERM: saved checkpoint at step %d, exiting", done)
                    preempted = True
                    break
        ckpt.wait()
        if preempted:
            return {"step": int(state.step), "preempted": True}
        final = evaluate(eval_step, state, eval_data, task, settings["eval_steps"], batch_sharding)
        writer.write(int(state.step), "eval", final)
        return {**final, "step": int(state.step), "preempted": False}
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()


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
