"""Training objectives and schedules as plug-ins: the trainer carries no paper's knobs.

An **objective** (:class:`Objective`) decides how many stochastic forward passes a train step runs and how their
losses combine (THOR's consistency regulariser runs two and adds the symmetric KL between their outputs). A **k
schedule** (:class:`KSchedule`) sets the experts per token of every routed layer for each step (SMoE-Dropout's
growing k). Each is a frozen, self-validating dataclass registered by name whose fields are flat in the ``train``
section (``train.consistency_weight=1.0``, ``train.moe_k_start=1``): the plug-in whose fields a config sets (to
something other than doing nothing) is the one used, else the ``standard`` objective and no schedule. Errors name
``train.<field>``. An experiment registers its own from its own directory, like a router kind.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
from flax import struct

from moejax.registry import Registry


@struct.dataclass
class PassOutput:
    """One forward pass of a train step.

    logits: the model's output; loss: float32[] mean CE plus the layers' weighted losses; ce, accuracy: float32[];
    terms: ``{name: float32[]}`` the layers' losses summed by name; stats: the layers' RoutingStats; moe_state: the
    updated non-gradient state.
    """

    logits: jax.Array
    loss: jax.Array
    ce: jax.Array
    accuracy: jax.Array
    terms: Any
    stats: Any
    moe_state: Any


class Objective:
    """Base of objective config dataclasses: ``name``, ``passes`` (forward passes per step, each with its own RNGs,
    :func:`moejax.training.steps.pass_rngs`) and :meth:`combine`."""

    name: ClassVar[str] = ""
    passes: ClassVar[int] = 1

    def is_identity(self) -> bool:
        """True when the fields make it the standard objective (then it is not chosen)."""
        return False

    def combine(self, runs: Sequence[PassOutput]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the step's loss, extra metrics) from the ``passes`` forward passes."""
        raise NotImplementedError


class KSchedule:
    """Base of k-schedule config dataclasses: ``name`` and :meth:`k`."""

    name: ClassVar[str] = ""

    def is_identity(self) -> bool:
        return False

    def k(self, step: int, total_steps: int) -> int | None:
        """The ``k`` of every routed layer at train step ``step`` (0-based; a static int, one compiled step per
        value), or None for each layer's ``router.k``."""
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("training objective", "train.objective")
K_SCHEDULES: Registry[type[KSchedule]] = Registry("k schedule", "train.k_schedule")


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _register(registry: Registry, cls: type, base: type) -> type:
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, base) and cls.name):
        raise TypeError(f"register: {cls!r} must be a dataclass subclass of {base.__name__} with a name")
    from moejax.training.config import TRAIN_DEFAULTS
    taken = {n: "the trainer" for n in TRAIN_DEFAULTS}
    for reg in (OBJECTIVES, K_SCHEDULES):
        for name, other in reg.items():
            if not (reg is registry and name == cls.name):
                taken.update({n: f"{reg.what} {name!r}" for n in field_names(other)})
    for n in field_names(cls):
        if n in taken:
            raise ValueError(f"{registry.what} {cls.name!r}: field {n!r} is already a field of {taken[n]}")
    return registry.add(cls)


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes a frozen dataclass subclass of :class:`Objective` selectable by its fields."""
    return _register(OBJECTIVES, cls, Objective)


def register_k_schedule(cls: type[KSchedule]) -> type[KSchedule]:
    """Class decorator: makes a frozen dataclass subclass of :class:`KSchedule` selectable by its fields."""
    return _register(K_SCHEDULES, cls, KSchedule)


def plugin_fields() -> dict[str, dataclasses.Field]:
    """Every registered objective's and schedule's field, by name."""
    import moejax.training.objectives  # noqa: F401  (registers the built-in ones)
    import moejax.training.schedules  # noqa: F401
    return {f.name: f for reg in (OBJECTIVES, K_SCHEDULES) for cls in reg.values() for f in dataclasses.fields(cls)}


def _choose(registry: Registry, train: dict[str, Any]) -> Any:
    chosen = []
    for name, cls in registry.items():
        given = {n: train[n] for n in field_names(cls) if n in train}
        if not given:
            continue
        instance = cls(**given)
        if not instance.is_identity():
            chosen.append(instance)
    if len(chosen) > 1:
        raise ValueError(f"train: the fields of {registry.what}s {[c.name for c in chosen]} are all set; "
                         f"choose one")
    return chosen[0] if chosen else None


def choose(train: dict[str, Any]) -> tuple[Objective, KSchedule | None]:
    """(the objective, the k schedule or None) that the ``train`` section's flat fields select."""
    plugin_fields()
    objective = _choose(OBJECTIVES, train)
    return (objective if objective is not None else OBJECTIVES.get("standard")()), _choose(K_SCHEDULES, train)
