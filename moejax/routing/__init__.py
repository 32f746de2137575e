"""Routing: pure functions from router scores to a typed ``Routing`` value, plus the learned router.

Router kinds and transforms are plug-ins (:mod:`moejax.routing.plugin`): importing this package registers the
built-in ones (each kind next to its routing function, each transform in :mod:`moejax.routing.transforms`).
"""
from moejax.routing.scorers.attention import attention_router_logits
from moejax.routing.balanced import (balanced_assignment, base_routing, capped_transport_plan, expert_slots,
                                     sinkhorn_plan, sinkhorn_routing, sparse_ot_routing)
from moejax.routing.dynamic import active_experts_histogram, top_p_routing
from moejax.routing.ksparse_ot_router import ksparse_ot_routing  # noqa: F401  (registers kind='ksparse_ot')
from moejax.routing.expert_choice import expert_choice_routing
from moejax.routing.fixed import consistency_loss, hash_routing, hash_scores, random_routing, routing_from_assignment
from moejax.routing.losses import (aux_free_bias_update, expert_fraction, importance_loss, load_balance_loss,
                                   mean_confidence, mean_entropy, router_z_loss)
from moejax.routing.noise import drop_gates, gumbel_noise
from moejax.routing import transforms
from moejax.routing.config import RouterConfig
from moejax.routing.plugin import (LayerFacts, RouteCall, RouterKind, Transform, register_router,
                                   register_transform, router_kind, router_kinds)
from moejax.routing.router import Router
from moejax.routing.schedules import (SCHEDULES, layer_budget, schedule_weights, scheduled_moe_layers,
                                      smoe_dropout_k)
from moejax.routing.threshold import threshold_routing
from moejax.routing.topk import finish_token_choice, limit_to_top_groups, scores_from_logits, top_k_routing
from moejax.routing.types import AnyRouting, ExpertChoiceRouting, Routing, RoutingStats
from moejax.routing.loss import Loss, LossInputs, register_loss, weighted_losses

__all__ = [
    "LayerFacts", "RouteCall", "RouterConfig", "RouterKind", "Transform", "register_router", "register_transform",
    "router_kind", "router_kinds", "transforms",
    "SCHEDULES", "attention_router_logits", "balanced_assignment", "base_routing", "capped_transport_plan",
    "expert_slots", "layer_budget", "schedule_weights", "scheduled_moe_layers", "sinkhorn_plan", "sinkhorn_routing",
    "sparse_ot_routing", "threshold_routing",
    "AnyRouting", "Loss", "LossInputs", "register_loss", "weighted_losses", "active_experts_histogram", "consistency_loss", "drop_gates", "gumbel_noise",
    "hash_routing", "hash_scores", "random_routing", "routing_from_assignment", "smoe_dropout_k", "top_p_routing", "ExpertChoiceRouting", "Router", "Routing", "RoutingStats",
    "aux_free_bias_update", "expert_choice_routing", "expert_fraction", "finish_token_choice",
    "importance_loss", "limit_to_top_groups", "load_balance_loss", "mean_confidence", "mean_entropy",
    "router_z_loss", "scores_from_logits", "top_k_routing",
]
