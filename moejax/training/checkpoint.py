"""orbax checkpoints: save every N steps, keep the last K, resume from the newest good one.

What a checkpoint must survive, and how:

- **Partial writes.** orbax writes each step to a temporary directory and renames it when complete, so a run
  killed mid-save leaves no half-written step behind.
- **Bit rot.** Every saved array has a 64-bit checksum (two 32-bit sums over its bits, computed on the devices:
  see :func:`tree_digests`), stored in the step's own orbax metadata (``custom_metadata``, written atomically
  with the step) and verified after each restore. Any single flipped bit changes the first sum.
- **Unreadable or corrupt steps.** A step whose metadata or arrays cannot be read, or whose arrays do not match
  their checksums, is moved aside to ``<workdir>/corrupt_checkpoints/`` with a warning and the next older one
  is tried: nothing is deleted, and the moved step no longer blocks saving that step again.
- **A different model.** Before reading any array, the checkpoint's full tree (every path, shape and dtype,
  from its metadata) is compared with the model's; a difference is a :class:`CheckpointMismatchError` naming
  the first differing path, and the checkpoint stays where it is.
- **Nothing usable.** When the workdir held checkpoints but none could be used, :meth:`Checkpointer.restore_latest`
  raises :class:`NoUsableCheckpointError` (saying what to do) instead of letting the run start over at step 0.
- **Non-finite values** are never written: :meth:`Checkpointer.save` refuses them (``NonFiniteError`` naming the
  first offending leaf), and a restored state with non-finite values is an error too.
- **A directory that stops accepting writes** (permissions, a read-only or full filesystem). Before each save a probe
  file is created and removed in the checkpoint directory, so that the common cases fail at once, in the caller,
  before orbax starts its background threads. A write that fails later, in orbax's background save, surfaces at
  the next :meth:`Checkpointer.save`, :meth:`Checkpointer.wait` or :meth:`Checkpointer.close`. Either way the caller
  gets a :class:`CheckpointWriteError` naming the directory, the step and the error, and the last good checkpoint is
  untouched (orbax renames a step into place only when it is complete). After a failure the checkpointer refuses
  further saves and no longer waits for orbax's threads: a failed save can leave them waiting on each other until
  orbax's coordination timeout, which is how a run used to hang.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from moejax.hashing import fmix32 as _fmix32
from moejax.parallel.sharding import path_name
from moejax.training.steps import NonFiniteError

log = logging.getLogger("moejax")

# Key of the checksums in a step's orbax custom metadata, and the version of the digest below.
CHECKSUM_KEY = "moejax_checksums"
CHECKSUM_VERSION = 1
# orbax's per-step metadata file (JSON), where ``custom_metadata`` lives.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint holds a train state of a different model (or optimiser) than the config's."""


class NoUsableCheckpointError(RuntimeError):
    """The workdir held checkpoints, but none could be restored: the run refuses to start over at step 0."""


class ChecksumError(ValueError):
    """A restored array does not match the checksum saved with it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the directory, the step and the underlying error are in the message)."""


# ----------------------------------------------------------------------------- tree layout and digests

def tree_layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of every array of a pytree, of ``ShapeDtypeStruct``s, or of orbax's metadata.

    Paths are :func:`moejax.parallel.sharding.path_name` strings (dict keys, indices and attribute names alike), so
    that a state's optax namedtuples and tuples and the dicts and lists that orbax's metadata reads back give the
    same paths.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for p, x in flat}


def first_difference(wanted: dict[str, Any], found: dict[str, Any]) -> str | None:
    """A description of the first difference between two :func:`tree_layout` dicts, or None when they are equal.

    Parameters are compared first (a difference there names the layer that changed), then the rest of the state.
    """
    ordered = sorted(wanted.items(), key=lambda item: not item[0].startswith("params/"))   # stable
    for path, (shape, dtype) in ordered:
        if path not in found:
            return f"{path} (shape {shape}, {dtype}) is not in the checkpoint"
        if found[path] != (shape, dtype):
            return (f"{path}: the checkpoint has shape {found[path][0]} {found[path][1]}, this config "
                    f"shape {shape} {dtype}")
    for path, (shape, dtype) in found.items():
        if path not in wanted:
            return f"{path} (shape {shape}, {dtype}) is in the checkpoint but not in this config's state"
    return None


def _as_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (one per element up to 32 bits, a trailing axis for wider dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = np.dtype(x.dtype).itemsize * 8
    if bits >= 32:
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16}[bits]).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint32[2] digest, bool finite) of one array.

    With ``w`` the array's bits as uint32 words and ``i`` each word's flat index, the digest is
    ``(sum w_i * (2 i + 1), sum fmix32(w_i ^ fmix32(i + c)))`` mod 2^32. The first sum changes with any single
    flipped bit (the weights are odd), the second mixes each word with its position, so that swapped or
    overwritten blocks are caught too (2^-64 odds of a miss). Integer sums wrap exactly, so the digest does
    not depend on the device, the sharding or the order of the reduction.
    """
    words = _as_words(x)
    idx = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= words.shape[axis]
    s1 = jnp.sum(words * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    s2 = jnp.sum(_fmix32(words ^ _fmix32(idx + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.ones((), bool)
    return jnp.stack([s1, s2]), finite


@jax.jit
def _digests(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    pairs = [_leaf_digest(x) for x in leaves]
    if not pairs:
        return jnp.zeros((0, 2), jnp.uint32), jnp.zeros((0,), bool)
    return jnp.stack([d for d, _ in pairs]), jnp.stack([f for _, f in pairs])


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def tree_digests(tree: Any) -> tuple[dict[str, str], list[str]]:
    """(``{path: 16 hex digits}`` for every array of ``tree``, paths of the non-finite floating arrays).

    One jitted pass over the (possibly sharded) arrays on their devices; only 8 bytes and a flag per array come
    back to the host.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_name(p) for p, _ in flat]
    digests, finite = _digests([x for _, x in flat])
    digests, finite = _host(digests), _host(finite)
    sums = {p: f"{int(d[0]):08x}{int(d[1]):08x}" for p, d in zip(paths, digests)}
    return sums, [p for p, ok in zip(paths, finite) if not ok]


# ----------------------------------------------------------------------------- the checkpointer

def prove_writable(directory: pathlib.Path) -> None:
    """Creates ``directory`` if needed and a probe file in it, removed at once; raises the ``OSError`` if either
    fails (the workdir check before a run, and the checkpoint directory before each save)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".moejax-write-probe-"):
        pass


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one pytree (the train state as a dict)."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.quarantine_dir = self.workdir / "corrupt_checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        # Naming the handler lets a fresh manager read metadata of steps it did not write itself.
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())
        self.failed: CheckpointWriteError | None = None     # the first write failure; no save after it
        self._in_flight: int | None = None                  # the step of the last save started

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        """Saves (asynchronously when enabled) the pytree at ``step`` with the checksum of every array; an
        existing step is left alone. Raises ``NonFiniteError`` naming the first non-finite array, writing nothing.
        """
        if self.failed is not None:
            raise self.failed
        if step in self.manager.all_steps():
            return
        sums, nonfinite = tree_digests(tree)
        if nonfinite:
            raise NonFiniteError(f"step {step}: refusing to save a checkpoint with non-finite values (first: "
                                 f"{nonfinite[0]}); nothing was written to {self.directory}")
        # The previous (asynchronous) save must have succeeded; orbax's save would wait for it too, but then its
        # failure would be reported as this step's.
        self.wait()
        self._probe(step)
        meta = {CHECKSUM_KEY: {"version": CHECKSUM_VERSION, "arrays": sums}}
        self._in_flight = step
        try:
            self.manager.save(step, args=ocp.args.StandardSave(tree), force=True, custom_metadata=meta)
        except Exception as err:  # noqa: BLE001 - any failure to write is reported the same way, once
            raise self._fail(step, err) from err

    def wait(self) -> None:
        """Waits for the save in flight; raises :class:`CheckpointWriteError` if it (or an earlier one) failed."""
        if self.failed is not None:
            raise self.failed
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._fail(self._in_flight, err) from err

    def _probe(self, step: int) -> None:
        """Creates and removes a file in the checkpoint directory: an unwritable directory fails here, not in orbax's
        background threads."""
        try:
            prove_writable(self.directory)
        except OSError as err:
            raise self._fail(step, err) from err

    def _fail(self, step: int | None, err: BaseException) -> CheckpointWriteError:
        good = self._complete_steps()
        what = f"step {step}" if step is not None else "a checkpoint"
        first_line = (str(err).splitlines() or [""])[0][:300]
        self.failed = CheckpointWriteError(
            f"checkpoint: could not write {what} to {self.directory} ({type(err).__name__}: {first_line}); last good "
            f"checkpoint: {f'step {good[-1]}' if good else 'none'}")
        return self.failed

    def _complete_steps(self) -> list[int]:
        """Steps whose directories orbax finished (renamed into place), read from the filesystem."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        except OSError:
            return []

    def saved_checksums(self, step: int) -> dict[str, str] | None:
        """The checksums saved with ``step`` (None for a checkpoint written without them).

        The step's metadata file is parsed here rather than through ``manager.metadata``, which reads an
        unparsable file as empty metadata: a damaged file must make the step unreadable, not unverified.
        """
        path = self.directory / str(step) / STEP_METADATA_FILE
        if not path.exists():
            return None
        custom = json.loads(path.read_text()).get("custom_metadata") or {}
        entry = custom.get(CHECKSUM_KEY)
        if entry is None:
            return None
        if entry.get("version") != CHECKSUM_VERSION:
            raise ValueError(f"checksums of version {entry.get('version')!r}, this moejax reads {CHECKSUM_VERSION}")
        return dict(entry["arrays"])

    def verify(self, step: int, tree: Any, sums: dict[str, str] | None) -> list[str]:
        """Checks the restored ``tree`` of ``step`` against ``sums``; returns the paths of its non-finite arrays.

        Raises :class:`ChecksumError` naming the first array that differs from what was saved.
        """
        found, nonfinite = tree_digests(tree)
        if sums is None:
            log.warning("moejax: checkpoint at step %d has no checksums (written by an older moejax); "
                        "restored without verifying it", step)
            return nonfinite
        if set(found) != set(sums):
            missing = sorted(set(sums) ^ set(found))
            raise ChecksumError(f"checksums do not cover the restored arrays (first: {missing[0]})")
        for path, digest in found.items():
            if sums[path] != digest:
                raise ChecksumError(f"checksum mismatch at {path} (saved {sums[path]}, read {digest})")
        return nonfinite

    def restore_latest(self, target: Any) -> tuple[Any, int] | None:
        """Restores the newest good checkpoint into ``target``'s structure; None if the workdir has none.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct``s (with shardings) giving the structure.
        Steps that cannot be read or fail their checksums are quarantined (moved, never deleted) and the next
        older one is tried. Raises :class:`CheckpointMismatchError` when a readable checkpoint holds a different
        tree (nothing is moved), ``NonFiniteError`` when it holds non-finite values, and
        :class:`NoUsableCheckpointError` when checkpoints were found but none could be used.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        wanted = tree_layout(abstract)
        moved: list[int] = []
        for step in reversed(self.steps()):
            try:
                found = tree_layout(self.manager.item_metadata(step).tree)
                sums = self.saved_checksums(step)
            except Exception as err:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                self._quarantine(step, err)
                moved.append(step)
                continue
            diff = first_difference(wanted, found)
            if diff is not None:
                # A readable checkpoint of another model is a config mistake, not corruption: keep it, stop.
                raise CheckpointMismatchError(
                    f"workdir: the checkpoint at step {step} in {self.directory} holds a different train state "
                    f"than this config: {diff}; use a fresh --workdir or the config it was trained with "
                    f"({self.workdir / 'config.json'})")
            try:
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                nonfinite = self.verify(step, restored, sums)
            except Exception as err:  # noqa: BLE001 - unreadable or altered data: this checkpoint is unusable
                self._quarantine(step, err)
                moved.append(step)
                continue
            if nonfinite:
                raise NonFiniteError(
                    f"workdir: the checkpoint at step {step} in {self.directory} holds non-finite values (first: "
                    f"{nonfinite[0]}); it was saved by a moejax without the state guard. Move "
                    f"{self.directory / str(step)} out of the way to resume from an older step, or use a fresh "
                    "--workdir")
            return restored, step
        earlier = sorted(p.name for p in self.quarantine_dir.iterdir()) if self.quarantine_dir.is_dir() else []
        if moved or earlier:
            what = (f"the checkpoints at steps {sorted(moved)} could not be used" if moved
                    else "it holds no checkpoint but earlier runs moved unusable ones aside")
            raise NoUsableCheckpointError(
                f"workdir: {what}; they are in {self.quarantine_dir} (nothing was deleted: {earlier}). Not starting "
                f"over at step 0: to train from scratch in this workdir, move {self.quarantine_dir} elsewhere "
                "first, or use a fresh --workdir")
        return None

    def restore_raw(self, step: int | None = None) -> Any:
        """The checkpoint at ``step`` (default: newest) as saved, without a target structure (for analysis).

        Its checksums are verified when it has them (:class:`ChecksumError` on a mismatch).
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"workdir: no checkpoint in {self.directory}")
        # Onto this process's first device, whatever mesh or process count wrote it.
        device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                          self.manager.item_metadata(step).tree)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        self.verify(step, restored, self.saved_checksums(step))
        return restored

    def _quarantine(self, step: int, err: Exception) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"{step}-{int(time.time())}"
        n = 1
        while dest.exists():
            dest = self.quarantine_dir / f"{step}-{int(time.time())}-{n}"
            n += 1
        first_line = (str(err).splitlines() or [""])[0][:200]
        log.warning("moejax: checkpoint at step %d could not be restored (%s: %s); moved to %s and falling back "
                    "to the previous one", step, type(err).__name__, first_line, dest)
        src = self.directory / str(step)
        try:
            shutil.move(str(src), str(dest))
        except FileNotFoundError:   # another process of this run (same filesystem) moved it first
            pass
        self.manager.reload()

    def close(self) -> None:
        """Waits for the save in flight and closes the manager (:class:`CheckpointWriteError` if the save failed).

        After a failure it returns at once: orbax's threads of the failed save may never finish (see the module doc).
        """
        if self.failed is not None:
            return
        self.wait()
        self.manager.close()


def read_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> tuple[Any, int]:
    """The checkpoint of ``workdir`` at ``step`` (default: the newest) as saved, and its step, for analysis and
    tools (:meth:`Checkpointer.restore_raw`: no target structure, checksums verified). Nothing is written; one-line
    errors name the workdir or the step."""
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ValueError(f"workdir={str(workdir)!r}: has no checkpoint")
        if step is not None and step not in steps:
            raise ValueError(f"step={step}: not a checkpoint of {workdir} (it has {steps})")
        step = steps[-1] if step is None else step
        return ckpt.restore_raw(step), int(step)
    finally:
        ckpt.close()
