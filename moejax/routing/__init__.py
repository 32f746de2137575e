"""Routing: pure functions from router scores to a typed ``Routing`` value, plus the learned router."""
from moejax.routing.expert_choice import expert_choice_routing
from moejax.routing.losses import (aux_free_bias_update, expert_fraction, importance_loss, load_balance_loss,
                                   mean_confidence, mean_entropy, router_z_loss)
from moejax.routing.router import Router
from moejax.routing.topk import finish_token_choice, limit_to_top_groups, scores_from_logits, top_k_routing
from moejax.routing.types import AnyRouting, AuxLosses, ExpertChoiceRouting, Routing, RoutingStats

__all__ = [
    "AnyRouting", "AuxLosses", "ExpertChoiceRouting", "Router", "Routing", "RoutingStats",
    "aux_free_bias_update", "expert_choice_routing", "expert_fraction", "finish_token_choice",
    "importance_loss", "limit_to_top_groups", "load_balance_loss", "mean_confidence", "mean_entropy",
    "router_z_loss", "scores_from_logits", "top_k_routing",
]
