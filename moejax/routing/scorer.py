"""Scorers: how a learned router turns a token into one logit per expert (``x [T, D] -> logits [T, E]``).

A scorer is a frozen, self-validating dataclass registered by name (``router.scorer``) whose fields are its own
options (flat in a router config, like a kind's or a transform's: ``router.scorer='cosine'``,
``router.temperature=0.07``). It declares its parameters with logical axes (:meth:`Scorer.params`; the axis that
indexes experts is named ``'expert'``), computes the logits from them (:meth:`Scorer.logits`) and states its
forward FLOPs per token (:meth:`Scorer.flops_per_token`, used by the trainer's MFU). The :class:`~moejax.routing.Router`
declares the parameters (a transform may take one over, e.g. ``frozen`` keeps them in ``moe_state``), applies the
transforms' input and logit hooks around :meth:`Scorer.logits`, and hands the logits to the router kind.

Capabilities a scorer offers (``Scorer.offers``):
  ``expert_slices``  each expert's logit depends on the token, on the parameters without an ``'expert'`` axis and on
                     that expert's slice of the others alone, so removing or merging experts is slicing those
                     parameters along their ``'expert'`` axis (expert surgery: prune, merge).

Registering is importing the module that defines the class, so an experiment registers its own scorer from its own
directory::

    @register_scorer
    @dataclasses.dataclass(frozen=True)
    class Cosine(Scorer):
        name: ClassVar[str] = "cosine"
        offers: ClassVar[frozenset[str]] = frozenset({EXPERT_SLICES})
        temperature: float = 0.07
        ...
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax

from moejax.registry import Registry

EXPERT_SLICES = "expert_slices"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of a scorer: ``shape``, logical ``axes`` (one name or None per axis, ``'expert'`` for the axis
    that indexes experts) and ``init`` (a ``jax.nn.initializers`` initializer; None: the router's kernel init,
    ``N(0, 0.02^2)``)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Callable[..., jax.Array] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec: shape {self.shape} and axes {self.axes} differ in rank")

    @property
    def expert_axis(self) -> int | None:
        """The position of the ``'expert'`` axis, or None."""
        return self.axes.index("expert") if "expert" in self.axes else None


class Scorer:
    """Base of scorer config dataclasses; subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    offers: ClassVar[frozenset[str]] = frozenset()

    def params(self, d_model: int, num_experts: int) -> dict[str, ParamSpec]:
        """The parameters, by name (declared under the router: ``router/<name>``)."""
        raise NotImplementedError

    def logits(self, x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
        """x: float32[T, D] (after the transforms' input hook), params: by name -> float32[T, E] logits."""
        raise NotImplementedError

    def flops_per_token(self, d_model: int, num_experts: int) -> float:
        """Forward FLOPs per routed token (a multiply-add is 2)."""
        raise NotImplementedError


SCORERS: Registry[type[Scorer]] = Registry("scorer", "router.scorer")


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: makes a frozen dataclass subclass of :class:`Scorer` selectable as ``router.scorer``."""
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Scorer) and cls.name):
        raise TypeError(f"register_scorer: {cls!r} must be a dataclass subclass of Scorer with a name")
    from moejax.routing import plugin
    plugin.check_new_fields(cls, f"scorer {cls.name!r}", replacing=cls.name)
    return SCORERS.add(cls)


def scorer(name: Any) -> type[Scorer]:
    """The registered scorer class ``router.scorer=name`` (a one-line error naming the registered ones)."""
    return SCORERS.get(name)
