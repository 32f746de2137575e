"""Steering experts at inference (SteerMoE; Fayyaz et al. 2025, "Steering MoE LLMs via Expert (De)Activation").

:func:`steer` adds per-layer, per-expert offsets to the router logits through the registered router transform
``steer`` (:mod:`moejax.routing.transforms.steer`): the steered model is an ordinary moejax model whose config says
``router.steer=True`` and whose ``moe_state`` holds each layer's offsets float32[E_r]. ``+FORCE`` puts an expert into
every token's top-k, ``-FORCE`` removes it, 0 changes nothing; any router kind with learned logits works.

:func:`detect_behaviour_experts` is SteerMoE's detection: route two paired input sets ``A`` and ``B`` (say,
safe and unsafe completions) and rank the (layer, expert) pairs by the difference of their activation rates
``p_A(e) - p_B(e)`` (the fraction of tokens that use the expert); the top of the ranking is linked to ``A``'s
behaviour, the bottom to ``B``'s. :func:`offsets_for` turns a ranking into steering offsets.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from moejax.models.config import MLPConfig
from moejax.routing import plugin
from moejax.surgery import profile as profile_lib
from moejax.surgery.model import (LayerKey, MoELayerRef, SurgeryModel, check_sparse, get_in, moe_layers,
                                  resolve_layer, set_in)

# An offset no trained router logit competes with (float32 logits of order 1-100): the expert always (+) or
# never (-) wins, and exp(-FORCE) is exactly 0 in float32.
FORCE = 1e4
Offsets = Mapping[LayerKey, Mapping[int, float]]


def _check_offsets(ref: MoELayerRef, offsets: Mapping[int, float]) -> dict[int, float]:
    out = {}
    for e, value in offsets.items():
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < ref.spec.num_routed:
            raise ValueError(f"offsets[{ref.path}]: expert {e!r} is not in [0, {ref.spec.num_routed})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise ValueError(f"offsets[{ref.path}][{e}]={value!r}: must be a finite number (use +-FORCE={FORCE:g} "
                             f"to force an expert in or out)")
        out[int(e)] = float(value)
    return out


def _steered_spec(ref: MoELayerRef):
    spec = ref.spec
    if spec.router.steer:
        return spec
    if plugin.LEARNED not in spec.router.options.offers:
        raise ValueError(f"{ref.field}router.kind={spec.router.kind!r}: has no learned router logits to steer")
    try:
        return dataclasses.replace(spec, router=spec.router.replace(steer=True))
    except ValueError as e:
        raise ValueError(f"{ref.field}{e}") from None


def _with_steering(config: Any, refs: list[MoELayerRef]) -> Any:
    """``config`` with ``router.steer=True`` in the MoE specs of ``refs`` (all MoE layers of a shared spec)."""
    if isinstance(config, MLPConfig):
        layers = list(config.layers)
        for ref in refs:
            layers[ref.index] = _steered_spec(ref)
        return dataclasses.replace(config, layers=tuple(layers))
    return dataclasses.replace(config, moe=_steered_spec(moe_layers(config)[0]))


def steer(model: SurgeryModel, offsets: Offsets) -> SurgeryModel:
    """The model with router-logit ``offsets`` ``{layer: {expert: offset}}`` added to its steering.

    ``layer``: a position among the MoE layers or a parameter path; ``expert``: a router output in ``[0, E_r)``.
    Offsets add to a steered model's current ones. Layers that share the listed layers' MoE spec (every MoE layer
    of an ``LMConfig`` / ``ViTConfig``) are steered with zero offsets, which change nothing. Errors are one line:
    a router kind without learned logits, an expert out of range, a non-finite offset.
    """
    chosen = {}
    for key, per_expert in offsets.items():
        ref = resolve_layer(model, key)
        check_sparse(ref, "steer")
        chosen[ref.path] = (ref, _check_offsets(ref, per_expert))
    if not chosen:
        raise ValueError("offsets: empty (name at least one layer and expert)")
    shared = not isinstance(model.config, MLPConfig)
    refs = moe_layers(model) if shared else [ref for ref, _ in chosen.values()]
    config = _with_steering(model.config, refs)
    state = dict(model.variables.get("moe_state", {}))
    for ref in refs:
        keys = (*ref.keys, "router", "steer_offset")
        current = get_in(state, keys)
        vec = np.zeros(ref.spec.num_routed, np.float32) if current is None else np.array(current, np.float32)
        for e, value in chosen.get(ref.path, (None, {}))[1].items():
            vec[e] += value
        state = set_in(state, keys, jnp.asarray(vec))
    detail = {path: {str(e): v for e, v in per.items()} for path, (_, per) in chosen.items()}
    return model.replace(config=config, variables={**model.variables, "moe_state": state}).record(
        "steer", offsets=detail)


def steering_offsets(model: SurgeryModel) -> dict[str, np.ndarray]:
    """``{layer path: float32[E_r]}``: the current steering offsets (empty for an unsteered model)."""
    out = {}
    for ref in moe_layers(model):
        vec = get_in(model.variables.get("moe_state", {}), (*ref.keys, "router", "steer_offset"))
        if vec is not None:
            out[ref.path] = np.asarray(vec)
    return out


# ----------------------------------------------------------------------------- SteerMoE's detection

@dataclasses.dataclass
class BehaviourExperts:
    """Activation rates of two input sets and their difference, per layer path: ``rate_a``, ``rate_b``,
    ``difference`` float[E_r] (``rate_a - rate_b``); ``ranked``: every ``(layer path, expert, difference)`` by
    decreasing difference (A-linked experts first, B-linked last)."""

    rate_a: dict[str, np.ndarray]
    rate_b: dict[str, np.ndarray]
    difference: dict[str, np.ndarray]
    ranked: list[tuple[str, int, float]]

    def to_json(self) -> dict[str, Any]:
        return {"rate_a": {p: np.round(v, 6).tolist() for p, v in self.rate_a.items()},
                "rate_b": {p: np.round(v, 6).tolist() for p, v in self.rate_b.items()},
                "difference": {p: np.round(v, 6).tolist() for p, v in self.difference.items()},
                "ranked": [[p, e, round(d, 6)] for p, e, d in self.ranked]}


def _batches(inputs: Any, batch_size: int) -> Iterable[profile_lib.Batch]:
    if isinstance(inputs, (np.ndarray, list, tuple)) and not (len(inputs) and isinstance(inputs[0], profile_lib.Batch)):
        return profile_lib.array_batches(np.asarray(inputs), batch_size=batch_size)
    return inputs


def detect_behaviour_experts(model: SurgeryModel, inputs_a: Any, inputs_b: Any, *,
                             batch_size: int = 8) -> BehaviourExperts:
    """SteerMoE's detection over two paired input sets: each an array of model inputs [N, ...] (int32[N, L]
    tokens for an LM) or an iterable of :class:`~moejax.surgery.profile.Batch` (with masks for padding)."""
    prof_a = profile_lib.profile_experts(model, _batches(inputs_a, batch_size))
    prof_b = profile_lib.profile_experts(model, _batches(inputs_b, batch_size))
    rate_a = {p: lp.activation_rate for p, lp in prof_a.layers.items()}
    rate_b = {p: lp.activation_rate for p, lp in prof_b.layers.items()}
    diff = {p: rate_a[p] - rate_b[p] for p in rate_a}
    ranked = sorted(((p, int(e), float(d)) for p, v in diff.items() for e, d in enumerate(v)),
                    key=lambda item: (-item[2], item[0], item[1]))
    return BehaviourExperts(rate_a, rate_b, diff, ranked)


def offsets_for(found: BehaviourExperts, num: int, offset: float) -> dict[str, dict[int, float]]:
    """Steering offsets ``offset`` for the ``num`` most A-linked experts (``num > 0``) or the ``-num`` most B-linked
    ones (``num < 0``) of a detection: e.g. ``offsets_for(found, 5, -FORCE)`` deactivates the 5 experts most
    linked to A's behaviour."""
    if isinstance(num, bool) or not isinstance(num, int) or num == 0:
        raise ValueError(f"num={num!r}: must be a non-zero integer")
    picked = found.ranked[:num] if num > 0 else found.ranked[num:]
    out: dict[str, dict[int, float]] = {}
    for path, e, _ in picked:
        out.setdefault(path, {})[e] = float(offset)
    return out
