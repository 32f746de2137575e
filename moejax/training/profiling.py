"""``train.profile_steps``: a ``jax.profiler`` trace of a window of train steps, written into the workdir.

``profile_steps=(start, stop)`` traces the steps that take the train state from step ``start`` to step ``stop``
(the log line numbers ``start + 1`` to ``stop``) into ``workdir/profile/`` (TensorBoard's profile plugin layout:
``tensorboard --logdir workdir/profile`` or XProf). Every process traces its own host. Skip the first steps: they
compile. A resumed run that starts past ``start`` traces what is left of the window.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax

log = logging.getLogger("moejax")


def check_profile_steps(value: Any, steps: int) -> tuple[int, int] | None:
    """``train.profile_steps`` as a ``(start, stop)`` pair of ints with ``0 <= start < stop <= train.steps``, or
    None; a one-line ValueError naming the field otherwise."""
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"train.profile_steps={value!r}: must be None or a pair (start, stop) of step numbers, "
                         f"e.g. (10, 15)")
    start, stop = pair
    if not 0 <= start < stop <= steps:
        raise ValueError(f"train.profile_steps={value!r}: needs 0 <= start < stop <= train.steps={steps}")
    return start, stop


class ProfileWindow:
    """Starts a trace before the step leaving state ``start`` and stops it after the one reaching ``stop``."""

    def __init__(self, workdir: pathlib.Path, steps: tuple[int, int] | None):
        self.directory = pathlib.Path(workdir) / "profile"
        self.steps = steps
        self.active = False

    def before_step(self, step: int) -> None:
        """``step``: the train state's step before this train step runs."""
        if self.steps is not None and not self.active and self.steps[0] <= step < self.steps[1]:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
            log.info("moejax: profiling steps %d -> %d into %s", step, self.steps[1], self.directory)

    def after_step(self, done: int, result: Any = None) -> None:
        """``done``: the state's step after it; ``result``: waited for before the trace stops."""
        if self.active and done >= self.steps[1]:
            jax.block_until_ready(result)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
