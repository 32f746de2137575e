"""No silent loss of a run (issue 15): the state guard, the model-identity check, checkpoint checksums,
the checks made before any data is read or anything compiles, SIGTERM during start-up, and a chaos run
(random SIGKILLs and a corrupted checkpoint) that must end bit-identical to an uninterrupted one.

The in-process runs use one device (``mesh.num_devices=1``) and share one trained workdir (copied per test)
to keep the file fast on 2 cores.
"""
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.training import Checkpointer, NonFiniteError, loop, optim, train_and_evaluate
from moejax.training.checkpoint import CheckpointMismatchError, NoUsableCheckpointError, tree_digests
from test_training import _main_cmd, final_params, tiny_mlp

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


def small(data_dir, **train):
    """The 1-device tiny MLP run of these tests: checkpoints every 2 steps, 4 kept."""
    cfg = tiny_mlp(data_dir, **{"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 4, "log_every": 2,
                                "eval_every": 1000, "tensorboard": False, **train})
    cfg.mesh.num_devices = 1
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A workdir with checkpoints [2, 4, 6, 8] of ``small`` and its final parameters."""
    work = tmp_path_factory.mktemp("trained")
    train_and_evaluate(small(data_dir), work)
    return work, final_params(work)


@pytest.fixture
def workdir(trained, tmp_path):
    """A private copy of the trained workdir."""
    work = tmp_path / "work"
    shutil.copytree(trained[0], work)
    return work


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a checkpoint step (orbax's ocdbt ``d/`` blobs)."""
    return [f for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"]


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of a checkpoint step."""
    return max(data_files(step_dir), key=lambda f: f.stat().st_size)


def ruin(step_dir: pathlib.Path) -> None:
    """Garbage in every data file of a checkpoint step, so that no part of it restores. (Garbage in the largest file
    alone once left a step restorable in CI's Python 3.12 pass, orbax's layout there, and the run resumed from it.)"""
    for f in data_files(step_dir):
        write_garbage(f)


def flip_bit(path: pathlib.Path, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1 << bit
    path.write_bytes(bytes(data))


def write_garbage(path: pathlib.Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(random.Random(n).randrange(256) for _ in range(n))[:len(data) - mid]
    path.write_bytes(bytes(data))


def file_list(directory: pathlib.Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}


def quarantined(work: pathlib.Path) -> dict[int, pathlib.Path]:
    root = work / "corrupt_checkpoints"
    return {int(p.name.split("-")[0]): p for p in root.iterdir()} if root.exists() else {}


def steps_of(work) -> list[int]:
    ckpt = Checkpointer(work, async_save=False)
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def _no_build(config):
    raise AssertionError("data was loaded: the check should have come first")


# ----------------------------------------------------------------------------- 1. the state guard

def _inf_update_at(step: int):
    """make_optimizer, with the updates of train step ``step`` (0-based) multiplied by inf."""
    real = optim.make_optimizer

    def make(cfg, total):
        tx = real(cfg, total)

        def init(params):
            return tx.init(params), jnp.zeros((), jnp.int32)

        def update(grads, state, params=None):
            inner, count = state
            updates, inner = tx.update(grads, inner, params)
            scale = jnp.where(count == step, jnp.inf, 1.0)
            return jax.tree_util.tree_map(lambda u: u * scale, updates), (inner, count + 1)

        return optax.GradientTransformation(init, update)

    return make


def test_non_finite_update_is_refused_and_never_checkpointed(tmp_path, data_dir, monkeypatch):
    # Loss and gradient of step 3 are finite; only the update overflows. The old guard let the inf parameters
    # through, checkpointed them at step 4 and stopped at step 4 on a NaN loss.
    monkeypatch.setattr(loop.optim, "make_optimizer", _inf_update_at(3))
    with pytest.raises(NonFiniteError) as err:
        train_and_evaluate(small(data_dir), tmp_path)
    message = str(err.value)
    assert message.startswith("step 3: the update made the train state non-finite (first: params/"), message
    assert "Last good checkpoint: 2" in message
    assert steps_of(tmp_path) == [2]
    assert all(np.isfinite(x).all() for x in final_params(tmp_path))


def test_checkpointer_refuses_to_save_non_finite_values(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:
        with pytest.raises(NonFiniteError, match=r"step 1: refusing to save .*first: params/b"):
            ckpt.save(1, {"params": {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}, "step": jnp.int32(1)})
        assert ckpt.steps() == []
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- 2. model identity

def test_swapped_layers_are_a_different_model_not_corruption(workdir, data_dir):
    # Same (shape, dtype) multiset, different tree: the old check passed it, the restore failed, both good
    # checkpoints were moved aside and the run restarted from step 0 with exit code 0.
    cfg = small(data_dir)
    cfg.model.layers = [cfg.model.layers[1], cfg.model.layers[0]]
    before = file_list(workdir / "checkpoints")
    with pytest.raises(CheckpointMismatchError) as err:
        train_and_evaluate(cfg, workdir)
    message = str(err.value)
    assert message.startswith("workdir: the checkpoint at step 8 ") and "params/" in message, message
    assert "shape" in message and "\n" not in message
    assert isinstance(err.value, ValueError)
    assert file_list(workdir / "checkpoints") == before
    assert not (workdir / "corrupt_checkpoints").exists()


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(workdir, data_dir, caplog):
    before = {s: file_list(workdir / "checkpoints" / str(s)) for s in (2, 4, 6, 8)}
    for s in before:
        ruin(workdir / "checkpoints" / str(s))
    with caplog.at_level(logging.WARNING, logger="moejax"):
        with pytest.raises(NoUsableCheckpointError, match=r"could not be used.*Not starting over at step 0"):
            train_and_evaluate(small(data_dir), workdir)
    moved = quarantined(workdir)
    assert sorted(moved) == [2, 4, 6, 8]
    for s, files in before.items():                  # moved whole, nothing deleted
        assert file_list(moved[s]) == files
    assert (workdir / "metrics.jsonl").read_text().count("\n") >= 4     # the run's records are kept
    # Still refused on the next attempt: the workdir's checkpoints were not usable.
    with pytest.raises(NoUsableCheckpointError, match="move .*corrupt_checkpoints elsewhere"):
        train_and_evaluate(small(data_dir), workdir)


# ----------------------------------------------------------------------------- 3. integrity

def test_digest_sees_every_single_bit_and_ignores_sharding():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(16), jnp.float32)
    base = tree_digests({"x": x})[0]["x"]
    bits = np.asarray(x).view(np.uint32)
    for i in range(16):
        for b in range(32):
            flipped = bits.copy()
            flipped[i] ^= np.uint32(1 << b)
            assert tree_digests({"x": jnp.asarray(flipped.view(np.float32))})[0]["x"] != base, (i, b)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert tree_digests({"x": sharded})[0]["x"] == base


def test_flipped_bit_and_garbage_are_quarantined_and_the_run_falls_back(workdir, trained, data_dir, caplog):
    flip_bit(data_file(workdir / "checkpoints" / "8"))
    write_garbage(data_file(workdir / "checkpoints" / "6"))
    (workdir / "checkpoints" / "20.orbax-checkpoint-tmp-1234").mkdir()     # a half-written save left behind
    before = {s: file_list(workdir / "checkpoints" / str(s)) for s in (6, 8)}
    with caplog.at_level(logging.WARNING, logger="moejax"):
        result = train_and_evaluate(small(data_dir), workdir)       # resumes from 4, redoes 5..8
    assert "checkpoint at step 8 could not be restored (ChecksumError: checksum mismatch at" in caplog.text
    assert "checkpoint at step 6 could not be restored" in caplog.text
    assert result["step"] == 8
    moved = quarantined(workdir)
    assert sorted(moved) == [6, 8]
    for s, files in before.items():
        assert file_list(moved[s]) == files
    assert steps_of(workdir) == [2, 4, 6, 8]
    for a, b in zip(final_params(workdir), trained[1]):
        np.testing.assert_array_equal(a, b)


def test_checkpointer_metadata_damage_legacy_and_non_finite_checkpoints(tmp_path, caplog):
    import orbax.checkpoint as ocp
    tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(0)}
    # Damage to the step metadata (where the checksums live) makes the step unreadable, not unverified.
    ckpt = Checkpointer(tmp_path / "meta", async_save=False)
    try:
        ckpt.save(1, tree)
        ckpt.save(2, tree)
        write_garbage(tmp_path / "meta" / "checkpoints" / "2" / "_CHECKPOINT_METADATA", 16)
        with caplog.at_level(logging.WARNING, logger="moejax"):
            assert ckpt.restore_latest(tree)[1] == 1
        assert sorted(quarantined(tmp_path / "meta")) == [2]
    finally:
        ckpt.close()
    # Checkpoints written without checksums (an older moejax) restore with a warning; non-finite ones are refused.
    manager = ocp.CheckpointManager(tmp_path / "legacy" / "checkpoints", item_handlers=ocp.StandardCheckpointHandler())
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.save(2, args=ocp.args.StandardSave({**tree, "params": {"w": tree["params"]["w"] / 0.0}}))
    manager.wait_until_finished()
    manager.close()
    ckpt = Checkpointer(tmp_path / "legacy", async_save=False)
    try:
        with pytest.raises(NonFiniteError, match=r"checkpoint at step 2 .* non-finite values \(first: params/w\)"):
            ckpt.restore_latest(tree)
        shutil.move(str(tmp_path / "legacy" / "checkpoints" / "2"), str(tmp_path / "step2"))
        ckpt.manager.reload()
        with caplog.at_level(logging.WARNING, logger="moejax"):
            assert ckpt.restore_latest(tree)[1] == 1
        assert "checkpoint at step 1 has no checksums" in caplog.text
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- 5. checks before anything runs

@pytest.mark.parametrize("field,value,message", [
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate=inf: must be a finite number > 0"),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate=nan: "),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate=0.0: "),
    ("optimizer.learning_rate", 1e39, "optimizer.learning_rate=1e+39: "),
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate=-0.001: "),
    ("optimizer.b1", 1.5, "optimizer.b1=1.5: must be a finite number in [0, 1)"),
    ("optimizer.b1", -0.1, "optimizer.b1=-0.1: "),
    ("optimizer.b2", float("nan"), "optimizer.b2=nan: "),
    ("optimizer.b2", 1.0, "optimizer.b2=1.0: "),
    ("optimizer.momentum", -0.5, "optimizer.momentum=-0.5: "),
    ("optimizer.momentum", float("inf"), "optimizer.momentum=inf: "),
    ("optimizer.end_learning_rate_factor", float("nan"), "optimizer.end_learning_rate_factor=nan: "),
    ("optimizer.end_learning_rate_factor", -1.0, "optimizer.end_learning_rate_factor=-1.0: "),
    ("optimizer.weight_decay", float("inf"), "optimizer.weight_decay=inf: "),
    ("optimizer.grad_clip_norm", float("inf"), "optimizer.grad_clip_norm=inf: "),
    ("data.seed", -1, "data.seed=-1: must be an integer >= 0"),
    ("train.z_loss_weight", float("inf"), "train.z_loss_weight=inf: must be a finite number >= 0"),
])
def test_bad_values_fail_before_data_or_compilation(tmp_path, data_dir, monkeypatch, field, value, message):
    monkeypatch.setattr(loop, "build", _no_build)
    cfg = small(data_dir)
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError) as err:
        train_and_evaluate(cfg, tmp_path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_batch_larger_than_the_dataset_fails_before_compilation(tmp_path, data_dir, monkeypatch):
    def no_init(*args, **kwargs):
        raise AssertionError("compiled before checking the batch size")

    monkeypatch.setattr(loop, "init_state", no_init)
    cfg = small(data_dir)
    cfg.data.batch_size = 2048                       # digits' train split has 1437 examples
    with pytest.raises(ValueError, match=r"^data\.batch_size=2048: larger than the 1437 examples"):
        train_and_evaluate(cfg, tmp_path)


def test_unwritable_workdir_fails_before_loading_data(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(loop, "build", _no_build)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"^workdir='.*a_file/run': not a writable directory"):
        train_and_evaluate(small(data_dir), tmp_path / "a_file" / "run")
    if os.geteuid() != 0:                            # root writes through permission bits
        ro = tmp_path / "read_only"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"^workdir='.*read_only': not a writable directory"):
            train_and_evaluate(small(data_dir), ro)


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that reaches this handler (the trainer had none installed) fails the test instead of killing it."""
    def refuse(signum, frame):
        raise RuntimeError("SIGTERM was not handled by the trainer")

    previous = signal.signal(signal.SIGTERM, refuse)
    yield
    signal.signal(signal.SIGTERM, previous)


def _sigterm_during_build(monkeypatch):
    real_build = loop.build
    compiled = []

    def build(config):
        os.kill(os.getpid(), signal.SIGTERM)        # while the data is loading
        return real_build(config)

    def make_train_step(*args, **kwargs):
        compiled.append(1)
        raise AssertionError("a train step was built after SIGTERM")

    monkeypatch.setattr(loop, "build", build)
    monkeypatch.setattr(loop, "make_train_step", make_train_step)
    return compiled


def test_sigterm_during_start_up_takes_the_preemption_path(workdir, tmp_path, data_dir, monkeypatch, sigterm_guard):
    compiled = _sigterm_during_build(monkeypatch)
    result = train_and_evaluate(small(data_dir, steps=12), workdir)
    assert result == {"step": 8, "preempted": True}
    assert steps_of(workdir) == [2, 4, 6, 8]
    fresh = tmp_path / "fresh"
    assert train_and_evaluate(small(data_dir), fresh) == {"step": 0, "preempted": True}
    assert steps_of(fresh) == [0]
    assert not compiled
    assert signal.getsignal(signal.SIGTERM).__name__ == "refuse"     # the caller's handler is back


# ----------------------------------------------------------------------------- chaos

def _complete_steps(ckpts: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_chaos_random_sigkills_and_a_corrupted_checkpoint(tmp_path, data_dir):
    """Three SIGKILLs at random moments (mid-step or mid-save) and one flipped bit in the newest checkpoint
    between them; the run still ends bit-identical to an uninterrupted one, and no checkpoint file is deleted:
    the corrupted step sits whole in corrupt_checkpoints/."""
    seed = int(os.environ.get("MOEJAX_CHAOS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    steps = 60
    # One device, and a compilation cache that the first run fills, so that every later start takes seconds.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(workdir, name, checkpoint_every=3):
        cmd = _main_cmd(workdir, data_dir, f"--config.train.steps={steps}", "--config.train.log_every=3",
                        f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.keep_checkpoints=3",
                        "--config.train.eval_every=100000", "--config.train.eval_steps=1")
        with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
            return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)

    straight = None                 # the uninterrupted run, started once the first run has filled the cache
    work = tmp_path / "chaos"
    ckpts = work / "checkpoints"
    corrupted: dict[str, int] | None = None
    kills = 0
    for attempt in range(3):
        proc = start(work, f"run{attempt}")
        seen = _complete_steps(ckpts)
        deadline = time.time() + 120
        # Wait for this run to make progress (a new complete checkpoint), then kill it a random moment later.
        while time.time() < deadline and proc.poll() is None and (_complete_steps(ckpts) or [0])[-1] <= max(seen + [0]):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        kills += 1
        if straight is None:
            straight = start(tmp_path / "straight", "straight", checkpoint_every=steps)
        if attempt == 1:
            newest = ckpts / str(_complete_steps(ckpts)[-1])
            flip_bit(data_file(newest), bit=rng.randrange(8))
            corrupted = {"step": int(newest.name), **{"files": file_list(newest)}}
    assert kills == 3, f"the run finished before it was killed 3 times (seed {seed})"
    assert straight.wait(timeout=300) == 0, (logs / "straight.err").read_text()[-3000:]
    final = start(work, "final")
    assert final.wait(timeout=300) == 0, (logs / "final.err").read_text()[-3000:]
    out = (logs / "final.out").read_text()
    assert f"final step {steps}" in out and "layer 1: expert load" in out, out

    errors = "".join((logs / f"run{i}.err").read_text() for i in range(3)) + (logs / "final.err").read_text()
    assert f"checkpoint at step {corrupted['step']} could not be restored" in errors, f"seed {seed}"
    moved = quarantined(work)
    assert list(moved) == [corrupted["step"]], f"seed {seed}: {sorted(moved)}"
    assert file_list(moved[corrupted["step"]]) == corrupted["files"]
    for a, b in zip(final_params(tmp_path / "straight"), final_params(work), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")
    train = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == list(range(3, steps + 1, 3))


def test_routing_groups_that_do_not_fit_the_evaluation_batch_fail_before_compilation(tmp_path, data_dir, monkeypatch):
    def no_init(*args, **kwargs):
        raise AssertionError("compiled before checking the evaluation shape")

    monkeypatch.setattr(loop, "init_state", no_init)
    cfg = small(data_dir)                                                        # training batch 64
    cfg.data.eval_batch_size = 96
    cfg.model.layers[0]["dispatch"] = {"mode": "capacity", "group_size": 64}   # divides 64, not 96
    with pytest.raises(ValueError, match=r"^dispatch\.group_size=64: must divide the 96 tokens routed together .*"
                                         r"\(with the evaluation batch: data\.eval_batch_size=96\)$"):
        train_and_evaluate(cfg, tmp_path)
