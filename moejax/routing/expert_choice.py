"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing")."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin
from moejax.routing.types import ExpertChoiceRouting


def expert_choice_routing(logits: jax.Array, capacity: int) -> ExpertChoiceRouting:
    """Each expert takes the ``capacity`` tokens with the highest probability for it.

    As in the paper, ``S = softmax(logits)`` over experts per token; expert ``e`` takes
    ``top_C(S[:, e])`` and the combine weight of a slot is ``S[t, e]``. A token may be taken by several
    experts or by none. ``C`` is usually ``ceil(c * T / E)`` for an average of ``c`` experts per token.

    Args:
      logits: float32[T, E] router logits.
      capacity: ``C``, ``1 <= C <= T``.

    Returns:
      ``ExpertChoiceRouting`` with token_index int32[E, C] (tokens in descending probability) and
      weight float32[E, C]. Every expert has ``C`` slots, so the load-balancing loss is exactly 1 (``f_e = 1/E``);
      only the z-loss is usually worth training on.
    """
    t, e = logits.shape
    if not 1 <= capacity <= t:
        raise ValueError(f"capacity={capacity}: expert choice needs 1 <= C <= T={t}")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weight, token_index = jax.lax.top_k(probs.T, capacity)          # [E, C]
    valid = jnp.ones((e, capacity), bool)
    return ExpertChoiceRouting(token_index=token_index.astype(jnp.int32), weight=weight, valid=valid, probs=probs,
                               num_tokens=t)


@plugin.register_router
@dataclasses.dataclass(frozen=True)
class ExpertChoice(plugin.RouterKind):
    """``expert_choice``: each expert takes its top-``C`` tokens (:func:`expert_choice_routing`); ``router.k`` is the
    average number of experts per token, so ``C = ceil(capacity_factor * T * k / E)``. No own fields."""

    name: ClassVar[str] = "expert_choice"
    offers: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED})

    def route(self, logits: jax.Array, call: plugin.RouteCall) -> ExpertChoiceRouting:
        if call.capacity is None:
            raise ValueError("capacity: expert-choice routing needs the expert capacity C")
        return expert_choice_routing(logits, call.capacity)
