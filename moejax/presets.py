"""Named MoE layer presets from papers, as functions that return a validated :class:`~moejax.config.MoEConfig`.

A preset only does the arithmetic of a paper's layer recipe; everything else (expert kind, activation,
biases, dispatch, dtypes, other router fields) is passed through to ``MoEConfig`` unchanged, so a preset
composes with every mechanism of the core.

- :func:`gshard_top2`: ``N`` experts of width ``F``, top-2 softmax routing with the two gates
  renormalised to sum to one (Lepikhin et al. 2020, *GShard*, arXiv:2006.16668).
- :func:`deepseekmoe`: fine-grained expert segmentation plus shared-expert isolation (Dai et al. 2024,
  *DeepSeekMoE*, arXiv:2401.06066), sized so that total and active expert parameters equal those of
  ``N`` experts of width ``F`` with top-``K`` routing.

Errors are ``ValueError``s whose message starts with the offending argument (``segments=3: must divide
hidden_dim=64``), raised before any model is built.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from moejax.config import MoEConfig, RouterConfig

# Fields that a preset computes itself; passing them through ``**fields`` would silently undo the recipe.
_COMPUTED = ("num_experts", "hidden_dim", "num_shared_experts", "shared_hidden_dim")


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"{name}={value!r}: {why}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, value, "must be an integer >= 1")


def _check_fields(fields: dict[str, Any]) -> None:
    for name in _COMPUTED:
        if name in fields:
            _fail(name, fields[name], "is computed by the preset; pass the preset's own arguments instead")
    router = fields.get("router")
    if router is not None and not isinstance(router, RouterConfig):
        _fail("router", router, "must be a RouterConfig (its k and renormalize are set by the preset)")


def _router(fields: dict[str, Any], k: int, renormalize: bool) -> RouterConfig:
    base = fields.pop("router", None) or RouterConfig()
    return dataclasses.replace(base, kind="topk", k=k, renormalize=renormalize)


def gshard_top2(num_experts: int, hidden_dim: int, *, k: int = 2, renormalize: bool = True,
                **fields: Any) -> MoEConfig:
    """GShard's MoE layer: ``num_experts`` experts of width ``hidden_dim``, top-``k`` (2) softmax routing.

    GShard (Lepikhin et al. 2020, arXiv:2006.16668) sends each token to its two highest-scoring experts
    and normalises the two gates to sum to one (``renormalize=True``). Its random second-expert dispatch
    and group-local capacity are not part of this preset (dispatch is whatever ``fields['dispatch']``
    says; the default is dropless). ``k`` is exposed for the "GShard with more activated experts"
    baselines of the DeepSeekMoE paper.

    Args:
      num_experts: ``N`` (``E``).
      hidden_dim: ``F``, the hidden width of one expert.
      k: experts per token.
      renormalize: renormalise the ``k`` selected softmax gates (GShard does).
      **fields: any other :class:`MoEConfig` field (``expert_kind``, ``activation``, ``use_bias``,
        ``dispatch``, ``dtype``, ...); ``router`` may be a ``RouterConfig`` whose other fields are kept
        (its ``kind``, ``k`` and ``renormalize`` are replaced).
    """
    _positive_int("num_experts", num_experts)
    _positive_int("hidden_dim", hidden_dim)
    _positive_int("k", k)
    if k > num_experts:
        _fail("k", k, f"must be <= num_experts={num_experts}")
    if not isinstance(renormalize, bool):
        _fail("renormalize", renormalize, "must be a bool")
    fields = dict(fields)
    _check_fields(fields)
    router = _router(fields, k, renormalize)
    return MoEConfig(num_experts=num_experts, hidden_dim=hidden_dim, router=router, **fields)


def deepseekmoe(num_experts: int, hidden_dim: int, k: int = 2, *, segments: int = 4, shared: int = 1,
                renormalize: bool = False, **fields: Any) -> MoEConfig:
    """DeepSeekMoE's layer, sized against a baseline of ``num_experts`` experts of width ``hidden_dim``, top-``k``.

    Dai et al. 2024, *DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
    Models* (arXiv:2401.06066), Section 3. With ``N = num_experts``, ``F = hidden_dim``, ``K = k``,
    ``m = segments`` and ``K_s = shared``:

    1. *Fine-grained expert segmentation*: every one of the ``N`` experts is split into ``m`` experts of
       width ``F / m`` (``m`` must divide ``F``), giving ``m N`` fine-grained experts, of which ``m K`` are
       activated per token, so that the activated width stays ``K F``.
    2. *Shared expert isolation*: ``K_s`` of those fine-grained experts become shared experts that every
       token uses, and the router activates ``m K - K_s`` of the remaining ``m N - K_s`` routed experts.

    The returned config therefore has ``num_experts = m N - K_s`` routed experts of ``hidden_dim = F / m``,
    ``router.k = m K - K_s`` and ``num_shared_experts = K_s`` of ``shared_hidden_dim = F / m``.
    Consequences (checked in ``tests/test_presets.py``), with ``D`` the model width:

    - total expert hidden units ``(m N - K_s) F/m + K_s F/m = N F``, and activated hidden units
      ``(m K - K_s) F/m + K_s F/m = K F``: without biases the routed + shared expert parameters and the
      per-token expert FLOPs equal those of the baseline exactly (each hidden unit of an ``mlp`` expert
      holds ``2 D`` weights, of a ``glu`` expert ``3 D``);
    - with ``use_bias=True`` each routed expert also has an output bias of ``D`` (the shared experts,
      computed as one FFN, have one together), so the fine-grained layer has ``((m - 1) N - K_s + 1) D``
      more bias parameters (``((m - 1) K - K_s + 1) D`` more active ones): comparable, not equal;
    - the router has ``D (m N - K_s)`` weights instead of ``D N``; the paper counts it as negligible.

    These are the paper's own settings for its 2B validation models (``N = 16``, ``K = 2``, ``m = 4``,
    ``K_s = 1``: 63 routed experts of quarter width with top-7 plus one shared). The gates are the raw
    softmax scores over the routed experts, not renormalised (the paper's ``g_{i,t} = s_{i,t}`` for the
    top ``m K - K_s``), which is ``renormalize=False``; shared experts are added with weight one.

    Args:
      num_experts: ``N``, experts of the conventional baseline.
      hidden_dim: ``F``, width of one baseline expert.
      k: ``K``, experts per token of the baseline.
      segments: ``m``, fine-grained experts per baseline expert (1 = no segmentation).
      shared: ``K_s``, fine-grained experts isolated as shared experts (0 = none); must be ``< m K``
        so that at least one routed expert is activated.
      renormalize: renormalise the selected routed gates.
      **fields: any other :class:`MoEConfig` field, as in :func:`gshard_top2`.
    """
    _positive_int("num_experts", num_experts)
    _positive_int("hidden_dim", hidden_dim)
    _positive_int("k", k)
    if k > num_experts:
        _fail("k", k, f"must be <= num_experts={num_experts}")
    _positive_int("segments", segments)
    if hidden_dim % segments:
        _fail("segments", segments, f"must divide hidden_dim={hidden_dim}")
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        _fail("shared", shared, "must be an integer >= 0")
    if shared >= segments * k:
        _fail("shared", shared, f"must be < segments * k = {segments * k} (at least one routed expert per token)")
    if not isinstance(renormalize, bool):
        _fail("renormalize", renormalize, "must be a bool")
    fields = dict(fields)
    _check_fields(fields)
    width = hidden_dim // segments
    router = _router(fields, segments * k - shared, renormalize)
    return MoEConfig(num_experts=segments * num_experts - shared, hidden_dim=width, num_shared_experts=shared,
                     shared_hidden_dim=width if shared else None, router=router, **fields)
