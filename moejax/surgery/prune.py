"""Expert pruning: drop routed experts, remapping the router, so that the result is an ordinary moejax model with
fewer experts.

Three ways to choose what stays (``E`` experts before, ``E'`` after):

* :func:`keep_most_frequent`: the ``E'`` experts that receive most token copies on a dataset (a profile's
  ``frequency``; EASY-EP and task-specific pruning use such routing statistics);
* :func:`drop_experts` / :func:`prune`: an explicit list;
* :func:`prune_by_reconstruction`: greedy, on sample tokens: repeatedly remove the expert whose removal changes
  the layer's output least (mean squared error against the unpruned layer, with the router re-routing among the
  experts that remain, exactly as the pruned model will).

The router loses the dropped experts' kernel columns (and selection-bias / steering entries): tokens route among
the remaining experts as they would if the dropped ones had logit ``-inf``. An expert that is never chosen can
therefore be removed without changing any output. Pruning below ``router.k`` clips ``k`` (logged).
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.context import LayerContext
from moejax.layers.moe import MoELayer
from moejax.models.build import build_model
from moejax.surgery.model import (LayerKey, MoELayerRef, SurgeryModel, check_remappable, layer_variables,
                                  moe_layers, resized_spec, resolve_layer, select_experts, set_in, subset_arrays)
from moejax.surgery.profile import Batch, Profile


def prune(model: SurgeryModel, keep: Mapping[LayerKey, Sequence[int] | np.ndarray], *, how: str = "list"
          ) -> SurgeryModel:
    """The model keeping the experts ``keep`` ``{layer: int[E']}`` of each listed layer (sorted, so that the
    remaining experts keep their relative order)."""
    chosen = {}
    for key, idx in keep.items():
        ref = resolve_layer(model, key)
        check_remappable(ref, "prune")
        chosen[ref.path] = np.sort(np.asarray(idx, np.int64)).astype(np.int32)
    pruned = select_experts(model, chosen)
    return pruned.record("prune", how=how, keep={p: idx.tolist() for p, idx in chosen.items()})


def drop_experts(model: SurgeryModel, drop: Mapping[LayerKey, Sequence[int]]) -> SurgeryModel:
    """The model without the experts ``drop`` ``{layer: [expert, ...]}`` (FFN expert indices in ``[0, E)``)."""
    keep = {}
    for key, experts in drop.items():
        ref = resolve_layer(model, key)
        gone = {int(e) for e in experts}
        bad = sorted(e for e in gone if not 0 <= e < ref.spec.num_experts)
        if bad:
            raise ValueError(f"drop[{ref.path}]: expert {bad[0]} is not in [0, {ref.spec.num_experts})")
        keep[ref.path] = [e for e in range(ref.spec.num_experts) if e not in gone]
    return prune(model, keep, how="list")


def top_experts(frequency: np.ndarray, num_keep: int, num_experts: int) -> np.ndarray:
    """int32[E'] ascending: the ``num_keep`` FFN experts (of the first ``num_experts`` entries of ``frequency``, the
    rest being zero-computation experts) with the highest frequency; ties go to the lower index."""
    f = np.asarray(frequency, np.float64)[:num_experts]
    order = sorted(range(num_experts), key=lambda e: (-f[e], e))
    return np.sort(np.asarray(order[:num_keep], np.int32))


def _check_num_keep(ref: MoELayerRef, num_keep: int) -> None:
    if isinstance(num_keep, bool) or not isinstance(num_keep, (int, np.integer)) or num_keep < 1:
        raise ValueError(f"{ref.field}num_experts={num_keep!r}: pruning {ref.path} to {num_keep!r} experts would "
                         f"leave none (keep at least 1)")
    if num_keep > ref.spec.num_experts:
        raise ValueError(f"num_keep={num_keep}: {ref.path} has only {ref.spec.num_experts} experts")


def keep_most_frequent(model: SurgeryModel, frequency: Profile | Mapping[str, np.ndarray], num_keep: int,
                       *, layers: Sequence[LayerKey] | None = None) -> SurgeryModel:
    """The model keeping the ``num_keep`` most frequently routed experts of each MoE layer (or of ``layers``).

    ``frequency``: a :class:`~moejax.surgery.profile.Profile` or ``{layer path: float[E_r]}``."""
    freq = frequency.frequencies() if isinstance(frequency, Profile) else frequency
    refs = moe_layers(model) if layers is None else [resolve_layer(model, k) for k in layers]
    keep = {}
    for ref in refs:
        _check_num_keep(ref, num_keep)
        if ref.path not in freq:
            raise ValueError(f"frequency: no entry for {ref.path}")
        keep[ref.path] = top_experts(freq[ref.path], num_keep, ref.spec.num_experts)
    return prune(model, keep, how="frequency")


# ----------------------------------------------------------------------------- the reconstruction criterion

@functools.partial(jax.jit, static_argnums=0)
def _capture_inputs(config: Any, variables: Any, x: jax.Array) -> dict[str, jax.Array]:
    """{module path: the input of every MoELayer call} of a deterministic forward pass (compiled once per config)."""
    seen: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, MoELayer) and args:
            seen["/".join(context.module.scope.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        build_model(config).apply(variables, x, deterministic=True)
    return seen


def layer_inputs(model: SurgeryModel, batches: Iterable[Batch], *, max_tokens: int = 2048) -> dict[str, np.ndarray]:
    """``{layer path: float32[T, D]}``: the inputs that each sparse MoE layer receives in a deterministic forward
    pass over ``batches`` (masked tokens left out), at most ``max_tokens`` per layer."""
    variables = {k: v for k, v in model.variables.items() if k != "routing"}
    paths = [r.path for r in moe_layers(model)]
    out: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    count = 0
    for batch in batches:
        seen = _capture_inputs(model.config, variables, jnp.asarray(batch.inputs))
        for p in paths:
            x = np.asarray(seen[p])
            keep = np.ones(x.shape[:-1], bool) if batch.mask is None else np.broadcast_to(
                np.asarray(batch.mask).reshape(np.shape(batch.mask) + (1,) * (x.ndim - 1 - np.ndim(batch.mask))),
                x.shape[:-1]) > 0
            out[p].append(x[keep])
        count += int(out[paths[0]][-1].shape[0])
        if count >= max_tokens:
            break
    return {p: np.concatenate(v)[:max_tokens] for p, v in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def _layer_output(spec: Any, variables: Any, x: jax.Array) -> jax.Array:
    """y [T, D] of one sparse MoE layer of ``spec`` (compiled once per spec and token count)."""
    return MoELayer(spec).apply(variables, x, LayerContext(deterministic=True)).y


def _subset_variables(model: SurgeryModel, ref: MoELayerRef, keep: np.ndarray) -> dict[str, Any]:
    router, experts = subset_arrays(model, ref, keep)
    v = layer_variables(model, ref)
    for (collection, name), arr in router.items():
        v[collection] = set_in(v[collection], ("router", name), arr)
    v["params"] = set_in(v["params"], ("experts",), experts)
    return v


def reconstruction_order(model: SurgeryModel, layer: LayerKey | MoELayerRef, tokens: np.ndarray, num_keep: int
                         ) -> tuple[np.ndarray, list[float]]:
    """Greedy reconstruction pruning of one layer on ``tokens`` float[T, D] (the layer's inputs).

    Starting from all ``E`` experts, removes one expert at a time: the one whose removal gives the smallest mean
    squared output error ``mean_t |y_t - y'_t|^2`` against the unpruned layer, until ``num_keep`` remain. Returns
    (int32[num_keep] the kept experts ascending, the error after each removal). One compilation per size."""
    ref = resolve_layer(model, layer)
    check_remappable(ref, "prune")
    _check_num_keep(ref, num_keep)
    x = jnp.asarray(tokens, jnp.float32)
    reference = _layer_output(ref.spec, layer_variables(model, ref), x)
    remaining = list(range(ref.spec.num_experts))
    errors: list[float] = []
    while len(remaining) > num_keep:
        spec = resized_spec(ref, len(remaining) - 1)
        trial = []
        for e in remaining:
            keep = np.asarray([r for r in remaining if r != e], np.int32)
            y = _layer_output(spec, _subset_variables(model, ref, keep), x)
            trial.append(float(jnp.mean(jnp.sum(jnp.square(y - reference), axis=-1))))
        best = int(np.argmin(trial))          # ties: the lowest expert index
        errors.append(trial[best])
        remaining.pop(best)
    return np.asarray(remaining, np.int32), errors


def prune_by_reconstruction(model: SurgeryModel, batches: Iterable[Batch], num_keep: int, *,
                            max_tokens: int = 1024, layers: Sequence[LayerKey] | None = None) -> SurgeryModel:
    """The model keeping, in each MoE layer (or in ``layers``), the ``num_keep`` experts chosen by
    :func:`reconstruction_order` on the layer inputs of at most ``max_tokens`` tokens of ``batches``."""
    refs = moe_layers(model) if layers is None else [resolve_layer(model, k) for k in layers]
    for ref in refs:
        check_remappable(ref, "prune")
        _check_num_keep(ref, num_keep)
    inputs = layer_inputs(model, batches, max_tokens=max_tokens)
    keep, errors = {}, {}
    for ref in refs:
        keep[ref.path], errors[ref.path] = reconstruction_order(model, ref, inputs[ref.path], num_keep)
    pruned = prune(model, keep, how="reconstruction")
    last = dict(pruned.history[-1])
    last["errors"] = {p: [round(e, 8) for e in v] for p, v in errors.items()}
    return pruned.replace(history=(*pruned.history[:-1], last))

