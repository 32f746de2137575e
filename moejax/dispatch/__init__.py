"""Dispatch: move tokens to experts and back, given a routing.

The layer uses a :class:`~moejax.dispatch.dispatchers.Dispatcher` built from config
(:func:`~moejax.dispatch.dispatchers.from_config`: :class:`Capacity`, :class:`Dropless`, wrapped for expert
parallelism); :func:`apply` is the same as one function call with keyword arguments (tests, benchmarks, notebooks).
``capacity`` and ``dropless`` expose the plans and the dispatch/combine halves separately (the expert-parallel forms
put an all-to-all between them). Kernel backends: :mod:`moejax.dispatch.backends`.
"""
from __future__ import annotations

from typing import Callable

import jax

from moejax.dispatch import capacity, dropless, gmm
from moejax.dispatch.dispatchers import MODES, Capacity, Dispatcher, Dropless, ExpertFn, from_config, register_mode
from moejax.dispatch.gmm import get_fused_ffn, get_gmm, register_gmm
from moejax.dispatch.info import DispatchInfo, expert_choice_info, token_choice_info
from moejax.dispatch.sorting import group_by_expert, inverse_permutation
from moejax.routing.types import ExpertChoiceRouting, Routing


def apply(
    x: jax.Array,
    routing: Routing | ExpertChoiceRouting,
    expert_fn: ExpertFn,
    *,
    mode: str = "dropless",
    capacity: int | None = None,
    capacity_impl: str = "index",
    priority: str = "position",
    grouped_matmul: gmm.GroupedMatmul | None = None,
    groups: int = 1,
    fused_ffn: Callable[..., jax.Array] | None = None,
) -> tuple[jax.Array, DispatchInfo]:
    """``combine(expert_fn(dispatch(x)))`` for one routing decision.

    Args:
      x: [T, D] tokens.
      routing: token-choice or expert-choice routing of the T tokens.
      expert_fn: ``(tokens grouped by expert, grouping) -> outputs`` (e.g. an :class:`~moejax.experts.ExpertFFN`).
      mode: ``capacity`` or ``dropless``.
      capacity: ``C`` for token-choice capacity mode (expert choice carries its own).
      capacity_impl: ``einsum``, ``index`` or ``pallas`` (see :mod:`moejax.dispatch.capacity`).
      priority: ``position`` or ``score`` (capacity mode, token choice).
      grouped_matmul: the gmm for dropless (default: ``get_gmm('auto')``, with its ``fused_ffn``).
      fused_ffn: dropless: a whole-FFN form of the same layout (:func:`get_fused_ffn`) that the experts use
        instead of one gmm per matmul; None: the gmm alone (the default when ``grouped_matmul`` is given).
      groups: ``G`` routing groups of ``T/G`` consecutive tokens, each with its own capacity-``C`` buffers
        (capacity mode, token choice; ``capacity`` is then per group). Dropless mode ignores it.

    Returns:
      y: [T, D] and the :class:`DispatchInfo`.
    """
    if mode == "capacity":
        dispatcher = Capacity(capacity=capacity, impl=capacity_impl, priority=priority, groups=groups)
    elif mode == "dropless":
        dispatcher = Dropless(gmm=grouped_matmul, fused_ffn=fused_ffn)
    else:
        raise ValueError(f"dispatch.mode={mode!r}: must be one of {sorted(MODES)}")
    return dispatcher(x, routing, expert_fn)


__all__ = ["MODES", "Capacity", "DispatchInfo", "Dispatcher", "Dropless", "ExpertFn", "apply", "capacity", "dropless",
           "expert_choice_info", "from_config", "get_fused_ffn", "get_gmm", "gmm", "group_by_expert",
           "inverse_permutation", "register_gmm", "register_mode", "token_choice_info"]
