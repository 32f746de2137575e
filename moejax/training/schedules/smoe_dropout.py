"""SMoE-Dropout's growing number of experts per token (Chen et al. 2023, arXiv:2303.01610)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from moejax.routing.schedules import smoe_dropout_k
from moejax.training.plugin import KSchedule, register_k_schedule


def _int_at_least_one(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name}={value!r}: must be an integer >= 1")


@register_k_schedule
@dataclasses.dataclass(frozen=True)
class SMoEDropoutK(KSchedule):
    """``smoe_dropout`` (``train.moe_k_start``, ``train.moe_k_end``): every routed layer's ``k`` grows from
    ``moe_k_start`` to ``moe_k_end`` in a linear staircase over the run (:func:`moejax.routing.smoe_dropout_k`). A
    function of the step alone, so a resumed run continues with the k of a run that was never interrupted; each
    routed layer clips it to its number of router outputs."""

    name: ClassVar[str] = "smoe_dropout"
    moe_k_start: int | None = None
    moe_k_end: int | None = None

    def __post_init__(self) -> None:
        start, end = self.moe_k_start, self.moe_k_end
        for name, value in (("moe_k_start", start), ("moe_k_end", end)):
            if value is not None:
                _int_at_least_one(name, value)
        if (start is None) != (end is None):
            unset = "moe_k_end" if end is None else "moe_k_start"
            raise ValueError(f"train.{unset}: the k schedule needs both train.moe_k_start and train.moe_k_end "
                             f"(got moe_k_start={start!r}, moe_k_end={end!r})")
        if start is not None and start > end:
            raise ValueError(f"train.moe_k_end={end!r}: must be >= train.moe_k_start={start!r}")

    def is_identity(self) -> bool:
        return self.moe_k_start is None

    def k(self, step: int, total_steps: int) -> int | None:
        return smoe_dropout_k(step, total_steps, self.moe_k_start, self.moe_k_end)
