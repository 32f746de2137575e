"""orbax checkpoints: save every N steps, keep the last K, resume from the newest good one.

A checkpoint that fails to restore (corrupt or partially written) is moved aside to
``<workdir>/corrupt_checkpoints/`` with a warning, and the next older one is tried: nothing is deleted,
and the moved step no longer blocks saving that step again. orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves no half-written step behind.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("moejax")


def _signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of every array in a pytree or in orbax's checkpoint metadata tree."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one pytree (the train state as a dict)."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        # Naming the handler lets a fresh manager read metadata of steps it did not write itself.
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        """Saves (asynchronously when enabled) the pytree at ``step``; an existing step is left alone."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, target: Any) -> tuple[Any, int] | None:
        """Restores the newest checkpoint that loads into ``target``'s structure; None if there is none.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct``s (with shardings) giving the structure.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        wanted = _signature(abstract)
        for step in reversed(self.steps()):
            try:
                found = _signature(self.manager.item_metadata(step).tree)
            except Exception as err:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                self._quarantine(step, err)
                continue
            if found != wanted:
                # A readable checkpoint of another model is a config mistake, not corruption: keep it, stop.
                raise ValueError(f"workdir: the checkpoint at step {step} in {self.directory} holds a different "
                                 f"train state ({len(found)} arrays) than this config ({len(wanted)} arrays); "
                                 "use a fresh --workdir or the config it was trained with")
            try:
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as err:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                self._quarantine(step, err)
                continue
            return restored, step
        return None

    def restore_raw(self, step: int | None = None) -> Any:
        """The checkpoint at ``step`` (default: newest) as saved, without a target structure (for analysis)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"workdir: no checkpoint in {self.directory}")
        # Onto this process's first device, whatever mesh or process count wrote it.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                          self.manager.item_metadata(step).tree)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def _quarantine(self, step: int, err: Exception) -> None:
        dest = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.warning("moejax: checkpoint at step %d could not be restored (%s: %s); moved to %s and falling back "
                    "to the previous one", step, type(err).__name__, str(err).splitlines()[0][:200], dest)
        src = self.directory / str(step)
        if src.exists():
            shutil.move(str(src), str(dest))
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
