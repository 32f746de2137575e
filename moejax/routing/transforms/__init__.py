"""Router transforms: each composes with any router kind that offers the hook points it needs.

Imported in this order, which is the order a flat config applies them in (``RouterConfig.transforms``):
``frozen`` (router kernel in ``moe_state``), ``jitter`` (router input), ``gating_residual`` (logits), ``gumbel``
(selection logits), ``selection_bias`` and ``group_limit`` (selection scores), ``gate_dropout`` (the routing),
``steer`` (fixed per-expert logit offsets for inference-time steering, :mod:`moejax.surgery.steer`).
"""
from moejax.routing.transforms.frozen import Frozen
from moejax.routing.transforms.jitter import Jitter
from moejax.routing.transforms.gating_residual import GatingResidual
from moejax.routing.transforms.gumbel import Gumbel
from moejax.routing.transforms.selection_bias import SelectionBias
from moejax.routing.transforms.group_limit import GroupLimit
from moejax.routing.transforms.gate_dropout import GateDropout
from moejax.routing.transforms.steer import Steer

__all__ = ["Frozen", "GateDropout", "GatingResidual", "GroupLimit", "Gumbel", "Jitter", "SelectionBias", "Steer"]
