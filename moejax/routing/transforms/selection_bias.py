"""DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias on the selection scores, updated from the load."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import plugin
from moejax.routing.losses import aux_free_bias_update
from moejax.routing.types import Routing


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class SelectionBias(plugin.Transform):
    """``selection_bias``: a bias ``moe_state/selection_bias`` float32[E] added to the scores for choosing experts
    only (never to the weights, no gradient). ``bias_update_rate`` ``gamma``: in training, with ``moe_state``
    mutable, ``b_e += gamma * sign(mean load - load_e)`` after routing the batch (which used the old bias).

    Applying a model without ``moe_state`` in its variables is an error naming the collection (a missing bias
    would silently route as if it were zero)."""

    name: ClassVar[str] = "selection_bias"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.SELECTION_SCORES})
    selection_bias: bool = False
    bias_update_rate: float = 0.001

    def __post_init__(self) -> None:
        if not isinstance(self.selection_bias, bool):
            plugin.fail("selection_bias", self.selection_bias, "must be a bool")
        r = self.bias_update_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            plugin.fail("bias_update_rate", r, "must be a finite number >= 0")

    def is_identity(self) -> bool:
        return not self.selection_bias

    def on_selection_scores(self, scores: jax.Array, call: plugin.RouteCall) -> jax.Array:
        bias = plugin.expert_state(call, "selection_bias", "selection_bias", "bias")
        return scores + jax.lax.stop_gradient(bias.value.astype(jnp.float32))

    def on_routing(self, routing: Routing, call: plugin.RouteCall) -> Routing:
        module = call.module
        # The bias declared by on_selection_scores in this call (absent if the kind did not select by scores).
        if (call.train and self.bias_update_rate > 0 and module.is_mutable_collection("moe_state")
                and not module.is_initializing() and module.has_variable("moe_state", "selection_bias")):
            bias = module.get_variable("moe_state", "selection_bias")
            module.put_variable("moe_state", "selection_bias",
                                aux_free_bias_update(bias, routing.expert_load, self.bias_update_rate))
        return routing
