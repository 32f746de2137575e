"""The capacity dispatch/combine operation: its backend type, its registry and the plan helpers backends share.

``dispatch(plan, x[T, D]) -> [E, C, D]`` gathers each kept token copy into its slot (empty slots zero);
``combine(plan, y[E, C, D]) -> [T, D]`` sums each token's kept copies' outputs times their combine weights
(dropped copies add nothing). ``plan`` is a :class:`~moejax.dispatch.capacity.TokenChoicePlan` or an
:class:`~moejax.routing.ExpertChoiceRouting`; gradients flow to ``x``, ``y`` and the plan's weights.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.dispatch.backends.registry import Backend, Operation
from moejax.routing.types import ExpertChoiceRouting


@dataclasses.dataclass(frozen=True)
class CapacityBackend(Backend):
    """A capacity dispatch/combine backend: ``dispatch(plan, x[, interpret=])``, ``combine(plan, y[, interpret=])``."""

    dispatch: Callable[..., jax.Array]
    combine: Callable[..., jax.Array]

    def bind(self, platform: str) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
        """``(dispatch, combine)`` as plain ``(plan, array) -> array`` functions for ``platform``."""
        kwargs = self._interpret_kwargs(platform)
        if not kwargs:
            return self.dispatch, self.combine
        return functools.partial(self.dispatch, **kwargs), functools.partial(self.combine, **kwargs)


# ``pallas``: the Pallas kernels of the platform (the Mosaic ones interpreted on CPU). No ``auto``: the config names
# its implementation (``index`` by default).
CAPACITY = Operation("dispatch.capacity_impl", "capacity dispatch",
                     aliases={"pallas": {"tpu": ("pallas_mosaic",), "gpu": ("pallas_triton",),
                                         "cpu": ("pallas_mosaic",)}},
                     hint="'index'")


def register_capacity_backend(backend: CapacityBackend) -> CapacityBackend:
    """Makes ``backend`` selectable by its name (:func:`moejax.dispatch.capacity.dispatch`'s ``impl``). Note that
    ``DispatchConfig.capacity_impl`` only accepts the built-in names."""
    return CAPACITY.register(backend)


def select_capacity(name: str, platform: str | None = None) -> CapacityBackend:
    """The backend for ``dispatch.capacity_impl=name`` on ``platform`` (default: jax's backend), logged once."""
    return CAPACITY.select(name, platform)


def flat_slot(plan) -> jax.Array:
    """int32[T, K]: ``e * C + position`` for kept token-choice copies, ``E * C`` (out of range) for the rest."""
    out_of_range = plan.num_experts * plan.capacity
    return jnp.where(plan.kept, plan.expert_index * plan.capacity + plan.position, out_of_range)


def copy_slots(plan) -> tuple[jax.Array, jax.Array]:
    """int32[T, K'] slot ``e * C + c`` of every token copy (``E * C`` if none) and its float combine weight [T, K'].

    Token choice: ``K' = K`` (dropped copies out of range, weight zero). Expert choice: ``K' = E``, copy ``(t, e)``
    is token ``t`` in expert ``e`` (an expert holds a token at most once, as top-k over tokens guarantees); the
    weights are scattered from ``plan.weight``, so their gradient flows back to it.
    """
    if not isinstance(plan, ExpertChoiceRouting):
        return flat_slot(plan), plan.weight
    e, c = plan.token_index.shape
    t = plan.num_tokens
    rows = jnp.where(plan.valid, plan.token_index, t)                     # invalid slots: dropped by the scatter
    cols = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (e, c))
    slots = jnp.arange(e * c, dtype=jnp.int32).reshape(e, c)
    slot = jnp.full((t, e), e * c, jnp.int32).at[rows, cols].set(slots, mode="drop", unique_indices=True)
    weight = jnp.zeros((t, e), plan.weight.dtype).at[rows, cols].set(plan.weight, mode="drop", unique_indices=True)
    return slot, weight


def slot_table_kernels(dispatch_kernel: str, combine_kernel: str
                       ) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """``(dispatch(plan, x), combine(plan, y))`` running the row-gather kernels ``moejax.kernels.<dispatch_kernel>``
    and ``<combine_kernel>`` on the plan's slot table (:func:`copy_slots`); both take ``interpret=``.

    dispatch: x [T, D] -> buffers [E, C, D]; combine: y [E, C, D] -> [T, D] weighted per token.
    """

    def dispatch(plan, x: jax.Array, *, interpret: bool = False) -> jax.Array:
        from moejax import kernels  # local import: keeps Pallas out of ``import moejax``
        slot, _ = copy_slots(plan)
        e, c = plan.num_experts, plan.capacity
        return getattr(kernels, dispatch_kernel)(x, slot, e * c, interpret=interpret).reshape(e, c, x.shape[-1])

    def combine(plan, y: jax.Array, *, interpret: bool = False) -> jax.Array:
        from moejax import kernels
        slot, weight = copy_slots(plan)
        e, c, d = y.shape
        return getattr(kernels, combine_kernel)(y.reshape(e * c, d), slot, weight, interpret=interpret)

    return dispatch, combine
