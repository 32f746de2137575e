"""Schedules of routing hyper-parameters: over training steps (SMoE-Dropout) and over layers (DynaMoE).

All host-side, static Python values."""
from __future__ import annotations

import math
from typing import Any


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


# --------------------------------------------------------------------- layer-wise capacity (DynaMoE)

SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "hourglass", "wave")


def schedule_weights(schedule: str, num_layers: int) -> list[int]:
    """Integer shape weights ``w_l >= 1`` of a layer-wise schedule over ``L = num_layers`` layers.

    ``uniform``: 1; ``descending``: ``L - l`` (most capacity in the first layer); ``ascending``: ``l + 1``;
    ``pyramid``: ``min(l + 1, L - l)`` (peak in the middle); ``hourglass``: ``max(pyramid) + 1 - pyramid``
    (narrowest in the middle); ``wave``: 2 on even layers, 1 on odd ones (capacity alternates with depth).
    Gülmez 2026 (DynaMoE, arXiv:2603.01697) names descending, ascending, pyramid, wave and uniform among
    its six schedules; their exact curves are not given in what we could read, so these linear/alternating
    shapes are our choice; ``hourglass`` is the mirror of ``pyramid``.
    """
    _check_choice_schedule(schedule)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: must be an integer >= 1")
    n = num_layers
    pyramid = [min(i + 1, n - i) for i in range(n)]
    return {
        "uniform": [1] * n,
        "descending": [n - i for i in range(n)],
        "ascending": [i + 1 for i in range(n)],
        "pyramid": pyramid,
        "hourglass": [max(pyramid) + 1 - p for p in pyramid],
        "wave": [2 if i % 2 == 0 else 1 for i in range(n)],
    }[schedule]


def _check_choice_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {list(SCHEDULES)}")


def layer_budget(schedule: str, total: int, num_layers: int, *, field: str = "total") -> list[int]:
    """Splits an integer budget (experts, or experts per token) over layers: ``>= 1`` each, summing to ``total``.

    Every layer first gets 1; the remaining ``R = total - L`` units are shared in proportion to
    :func:`schedule_weights` by the largest-remainder (Hamilton) method in exact integer arithmetic: layer
    ``l`` gets ``floor(R w_l / W)`` and the leftover units go to the largest remainders ``R w_l mod W``, ties
    to the larger weight, then to the lower layer index. So the total is exact, the counts never differ
    from the proportional share by 1 or more, and a schedule whose weights are monotone (descending,
    ascending, and each half of pyramid/hourglass) gives monotone counts.

    Args:
      schedule: one of ``SCHEDULES``; total: the budget, ``>= num_layers``; num_layers: ``L >= 1``;
      field: the name used in error messages (e.g. ``total_experts``).
    """
    weights = schedule_weights(schedule, num_layers)
    if isinstance(total, bool) or not isinstance(total, int) or total < num_layers:
        raise ValueError(f"{field}={total!r}: must be an integer >= num_layers={num_layers} "
                         "(every layer gets at least 1)")
    rest, wsum = total - num_layers, sum(weights)
    counts = [1 + rest * w // wsum for w in weights]
    leftover = total - sum(counts)
    order = sorted(range(num_layers), key=lambda i: (-(rest * weights[i] % wsum), -weights[i], i))
    for i in order[:leftover]:
        counts[i] += 1
    return counts


def scheduled_moe_layers(base: Any, schedule: str, total_experts: int, num_layers: int,
                         total_k: int | None = None) -> tuple[Any, ...]:
    """Per-layer ``MoEConfig``s (an MLP model's ``model.layers``) from one expert budget and a schedule.

    Layer ``l`` is ``base`` with ``num_experts = layer_budget(schedule, total_experts, L)[l]`` and ``router.k``
    either ``layer_budget(schedule, total_k, L)[l]`` (the layer-dependent maximum of DynaMoE's dynamic
    routing, or the fixed k of top-k) or, when ``total_k`` is None, ``min(base.router.k, num_experts)``.

    Raises ``ValueError`` naming ``total_experts``/``total_k``/``schedule``/``num_layers``; ``total_k`` must
    give every layer ``k <= num_experts``. Use ``MoEConfig.to_dict`` on the results to put them in an
    ``ml_collections`` config.
    """
    import dataclasses

    from moejax.config import MoEConfig
    if not isinstance(base, MoEConfig):
        raise ValueError(f"base={base!r}: must be an MoEConfig")
    experts = layer_budget(schedule, total_experts, num_layers, field="total_experts")
    if total_k is None:
        ks = [min(base.router.k, e) for e in experts]
    else:
        ks = layer_budget(schedule, total_k, num_layers, field="total_k")
        for i, (k, e) in enumerate(zip(ks, experts)):
            if k > e:
                raise ValueError(f"total_k={total_k}: gives layer {i} k={k} > its num_experts={e} "
                                 f"(schedule={schedule!r}, total_experts={total_experts})")
    return tuple(dataclasses.replace(base, num_experts=e, router=dataclasses.replace(base.router, k=k))
                 for e, k in zip(experts, ks))
