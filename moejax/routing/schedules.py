"""Schedules of routing hyper-parameters that change during training (host-side, static values)."""
from __future__ import annotations

import math


def smoe_dropout_k(step: int, total_steps: int, k_start: int, k_end: int) -> int:
    """SMoE-Dropout's number of active experts at ``step``: grows linearly from ``k_start`` to ``k_end``.

    Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers"
    (arXiv:2303.01610), train with a random, frozen router (``router.frozen=True``) and gradually
    increase the number of activated experts during training, ending with all of them; at inference the
    number of experts is free (``MoELayer(...)(x, k=...)``). The paper describes a gradual increase; we
    use a linear staircase: each value ``k_start, ..., k_end`` is used for an equal share of the steps. ``K
    is a static shape, so the result is a Python int: call this on the host and jit one step function
    per distinct value (at most ``k_end - k_start + 1`` compilations).

    Args:
      step: current step, ``>= 0`` (clipped to ``total_steps``); total_steps: ``>= 1``;
      k_start, k_end: ``1 <= k_start <= k_end``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    if not 1 <= k_start <= k_end:
        raise ValueError(f"k_start={k_start}, k_end={k_end}: need 1 <= k_start <= k_end")
    frac = min(max(step, 0), total_steps) / total_steps
    return int(min(k_end, k_start + math.floor(frac * (k_end - k_start + 1))))
