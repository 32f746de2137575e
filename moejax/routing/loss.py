"""Auxiliary losses as plug-ins: each loss owns its weight and returns its term already weighted.

A loss is a frozen, self-validating dataclass registered by name (:func:`register_loss`) whose fields are its
weight (``<name>_weight``, flat in a router config: ``router.load_balance_weight=0.01``) and any options of its own.
A router config holds one instance of every registered loss (:attr:`~moejax.routing.RouterConfig.losses`); those
with weight 0 are not computed. After routing and dispatch, the layer builds one :class:`LossInputs` and
:func:`weighted_losses` returns ``{name: weight * value}``; the layer reports that dict
(``RoutingStats.losses``), the models collect it per layer, and the trainer adds every entry to the objective and
logs each by name (``loss/<name>``) without knowing any of them. An experiment adds its own loss with one file::

    @register_loss
    @dataclasses.dataclass(frozen=True)
    class Orthogonality(Loss):
        name: ClassVar[str] = "orthogonality"
        orthogonality_weight: float = 0.0

        def value(self, inputs):               # unweighted, a float32[] scalar
            ...

Each built-in loss states its value under uniform routing and its minimum in its docstring (``aux_losses/``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from moejax.registry import Registry
from moejax.routing.losses import fractions
from moejax.routing.types import AnyRouting


@struct.dataclass
class LossInputs:
    """What a loss may use, for one routed layer call (``T`` tokens, ``E`` router outputs).

    Attributes:
      routing: the layer's routing decision (token choice ``[T, K]`` or expert choice ``[E, C]``).
      probs: float32[T, E] the router's probabilities.
      logits: float32[T, E] the router logits the decision was made on (after the transforms), or None for kinds
        that learn nothing (hash, random).
      counts: float32[E] valid token copies the routing sends to each output, before any capacity drop (no
        gradient).
      weight_sums: float32[E] the combine weight each output receives, summed over tokens (with gradient).
      balance_weights: float32[E] how much each output's load counts in balance losses: 1 for FFN experts, MoE++'s
        ``tau`` for zero-computation experts (``MoEConfig.zero_computation_tau``).
    """

    routing: AnyRouting
    probs: jax.Array
    logits: jax.Array | None
    counts: jax.Array
    weight_sums: jax.Array
    balance_weights: jax.Array

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def fraction(self) -> jax.Array:
        """float32[E]: ``counts`` as fractions of all valid copies (0 when there are none); no gradient."""
        return jax.lax.stop_gradient(fractions(self.counts))


class Loss:
    """Base of loss config dataclasses: ``name``, a ``<name>_weight`` field, and :meth:`value`."""

    name: ClassVar[str] = ""

    @property
    def weight(self) -> float:
        return getattr(self, f"{self.name}_weight")

    def value(self, inputs: LossInputs) -> jax.Array:
        """The unweighted loss, a float32[] scalar."""
        raise NotImplementedError

    def check_weight(self) -> None:
        """Validates the weight field (call from ``__post_init__``): a finite number >= 0."""
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise ValueError(f"router.{self.name}_weight={w!r}: must be a finite number >= 0")


LOSSES: Registry[type[Loss]] = Registry("loss", "router.losses")


def register_loss(cls: type[Loss]) -> type[Loss]:
    """Class decorator: registers a frozen dataclass subclass of :class:`Loss` with a ``<name>_weight`` field."""
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Loss) and cls.name):
        raise TypeError(f"register_loss: {cls!r} must be a dataclass subclass of Loss with a name")
    from moejax.routing import plugin
    if f"{cls.name}_weight" not in plugin.field_names(cls):
        raise TypeError(f"register_loss: {cls.__name__} must have a field {cls.name + '_weight'!r}")
    plugin.check_new_fields(cls, f"loss {cls.name!r}", replacing=cls.name)
    return LOSSES.add(cls)


def loss_of_field(name: str) -> type[Loss] | None:
    from moejax.routing import plugin
    return next((c for c in LOSSES.values() if name in plugin.field_names(c)), None)


def loss_inputs(routing: AnyRouting, logits: jax.Array | None, balance_weights: jax.Array | None = None
                ) -> LossInputs:
    """The :class:`LossInputs` of a routing decision and the router logits it was made on (``balance_weights``:
    float32[E], default all 1)."""
    e = routing.probs.shape[-1]
    return LossInputs(routing=routing, probs=routing.probs, logits=logits,
                      counts=jax.lax.stop_gradient(routing.expert_counts()), weight_sums=routing.expert_weight_sums(),
                      balance_weights=jnp.ones((e,), jnp.float32) if balance_weights is None else balance_weights)


def weighted_losses(losses: tuple[Loss, ...], inputs: LossInputs) -> dict[str, jax.Array]:
    """``{name: weight * value}`` of the losses with a non-zero weight (float32[] each)."""
    return {loss.name: jnp.float32(loss.weight) * loss.value(inputs).astype(jnp.float32)
            for loss in losses if loss.weight != 0}


def sum_losses(per_layer: Any) -> dict[str, jax.Array]:
    """Sums dicts of losses by name (``[{name: scalar}, ...] -> {name: scalar}``)."""
    out: dict[str, jax.Array] = {}
    for losses in per_layer:
        for name, v in losses.items():
            out[name] = out[name] + v if name in out else v
    return out
