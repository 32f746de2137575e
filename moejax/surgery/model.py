"""The model that every expert-surgery tool works on: its MoE layers, their arrays, and rewriting their experts.

A :class:`SurgeryModel` is a typed model config (``LMConfig``, ``MLPConfig`` or ``ViTConfig``), its variables
(``{'params': ..., 'moe_state': ...}``, plain arrays) and its :class:`Origin`, which says how
:func:`moejax.surgery.io.save` writes it back: a moejax workdir (its experiment config and the step of the
checkpoint it came from) or a Hugging Face directory (its ``config.json``). Tools are pure functions
``SurgeryModel -> SurgeryModel``; only ``save`` writes, always into a new directory, never into the one the model
came from (:mod:`moejax.surgery.io` loads and saves).

Axis vocabulary: ``D`` model width, ``F`` expert hidden width, ``E`` FFN experts of a layer, ``E_r`` its router
outputs (``E`` plus MoE++ zero-computation experts, which come last), ``K`` experts per token.

Where a layer's arrays live (``<path>`` is :attr:`MoELayerRef.path`, e.g. ``decoder/block_1/ffn``):
``params/<path>/experts/{w_gate, w_up, w_down | w_in, w_out, b_*}`` ``[E, ...]``; the router's per-expert arrays:
the scorer's parameters, each with its ``'expert'`` axis where its :class:`~moejax.routing.scorer.ParamSpec` puts
it (``params/<path>/router/kernel`` ``[D, E_r]`` for a linear scorer; in ``moe_state`` for a frozen router),
``moe_state/<path>/router/selection_bias`` ``[E_r]`` and ``moe_state/<path>/router/steer_offset`` ``[E_r]``
(:mod:`moejax.surgery.steer`). A scorer parameter without an ``'expert'`` axis is shared by all experts and is
never sliced.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import MoEConfig
from moejax.models.build import build_model
from moejax.models.config import LMConfig, MLPConfig, ModelConfig, ViTConfig
from moejax.routing.scorer import EXPERT_SLICES
import moejax.routing.transforms.steer  # noqa: F401  (registers router.steer: configs and moe_layers read it)

log = logging.getLogger("moejax")

WORKDIR, HF = "workdir", "hf"
LayerKey = Union[int, str]


@dataclasses.dataclass(frozen=True, eq=False)
class Origin:
    """Where a model was loaded from, and what :func:`moejax.surgery.io.save` needs to write it back in the same form.

    Attributes:
      kind: ``workdir`` (a moejax training workdir) or ``hf`` (a Hugging Face directory).
      path: the directory it was loaded from.
      config: the typed model config as loaded; ``save`` writes the fields a tool changed relative to it.
      experiment: workdir: the experiment config the trainer wrote (``config.json``).
      step: workdir: the step of the checkpoint it was loaded from.
      rng: workdir: the run's base key data (``TrainState.rng``), kept so that a resumed run draws as before.
      hf_config: hf: the directory's ``config.json``.
    """

    kind: str
    path: str
    config: ModelConfig
    experiment: Mapping[str, Any] | None = None
    step: int | None = None
    rng: np.ndarray | None = None
    hf_config: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class SurgeryModel:
    """A model under surgery.

    Attributes:
      config: the typed model config (``LMConfig``, ``MLPConfig`` or ``ViTConfig``).
      variables: ``{'params': ..., 'moe_state': ...}`` of plain arrays (``moe_state`` absent or empty when the model
        has no non-gradient state).
      origin: how :func:`moejax.surgery.io.save` writes it (None: built in memory; it cannot be saved).
      history: one record per tool applied since loading (``{'tool': ..., ...}``), written to ``surgery.json``.
    """

    config: ModelConfig
    variables: Mapping[str, Any]
    origin: Origin | None = None
    history: tuple[Mapping[str, Any], ...] = ()

    @property
    def params(self) -> Any:
        return self.variables["params"]

    def module(self):
        """The flax model of :attr:`config` (``TransformerLM``, ``MLPClassifier`` or ``ViTClassifier``)."""
        return build_model(self.config)

    def replace(self, **changes: Any) -> "SurgeryModel":
        return dataclasses.replace(self, **changes)

    def record(self, tool: str, **details: Any) -> "SurgeryModel":
        """This model with ``{'tool': tool, **details}`` appended to its history (details must be JSON-able)."""
        return dataclasses.replace(self, history=(*self.history, {"tool": tool, **details}))


# ----------------------------------------------------------------------------- nested dict helpers

def get_in(tree: Any, keys: Sequence[str], default: Any = None) -> Any:
    """``tree[k0][k1]...``, or ``default`` when a key is missing."""
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return default
        tree = tree[k]
    return tree


def set_in(tree: Mapping[str, Any], keys: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``tree[k0]...[kn] = value``; the dicts along the path are copied, nothing else."""
    out = dict(tree)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        out[keys[0]] = set_in(tree.get(keys[0], {}), keys[1:], value)
    return out


# ----------------------------------------------------------------------------- MoE layers

@dataclasses.dataclass(frozen=True)
class MoELayerRef:
    """One MoE FFN of a model.

    Attributes:
      path: the parameter path of the layer (``decoder/block_1/ffn``, ``encoder/block_0/ffn``, ``layer_2``).
      spec: its ``MoEConfig``.
      index: the block / layer index ``i`` (its place in ``config.ffn_specs()``).
      position: its number among the model's MoE layers (0-based): how tools and the command line name layers.
    """

    path: str
    spec: MoEConfig
    index: int
    position: int

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    @property
    def field(self) -> str:
        """The config field prefix that fixes this layer's spec: ``model.moe.`` or ``model.layers[i].``."""
        return f"model.layers[{self.index}]." if self.path.startswith("layer_") else "model.moe."


def _ffn_path(config: ModelConfig, i: int) -> str:
    if isinstance(config, LMConfig):
        return f"decoder/block_{i}/ffn"
    if isinstance(config, ViTConfig):
        return f"encoder/block_{i}/ffn"
    if isinstance(config, MLPConfig):
        return f"layer_{i}"
    raise ValueError(f"config: {type(config).__name__} is not a moejax model config")


def moe_layers(model: SurgeryModel | ModelConfig) -> list[MoELayerRef]:
    """The MoE FFNs of a model (or config), in layer order."""
    config = model.config if isinstance(model, SurgeryModel) else model
    refs = []
    for i, spec in enumerate(config.ffn_specs()):
        if isinstance(spec, MoEConfig):
            refs.append(MoELayerRef(_ffn_path(config, i), spec, i, len(refs)))
    return refs


def resolve_layer(model: SurgeryModel | ModelConfig, key: LayerKey | MoELayerRef) -> MoELayerRef:
    """The MoE layer named by ``key``: its position among the MoE layers (int) or its parameter path (str)."""
    if isinstance(key, MoELayerRef):
        return key
    refs = moe_layers(model)
    for ref in refs:
        if (isinstance(key, (int, np.integer)) and not isinstance(key, bool) and ref.position == key) \
                or (isinstance(key, str) and ref.path == key.strip("/")):
            return ref
    raise ValueError(f"layer={key!r}: not an MoE layer of this model; its MoE layers are 0..{len(refs) - 1}: "
                     f"{[r.path for r in refs]}")


def check_sparse(ref: MoELayerRef, tool: str) -> None:
    """Refuses layers whose experts are not a routed sparse layer's (Soft MoE, SMEAR, Chain-of-Experts)."""
    if ref.spec.layer != "sparse":
        raise ValueError(f"{ref.field}layer={ref.spec.layer!r}: {tool} works on layer='sparse' MoE layers "
                         f"({ref.path})")


def layer_experts(model: SurgeryModel, layer: LayerKey | MoELayerRef) -> dict[str, jax.Array]:
    """``{name: [E, ...]}``: the stacked routed-expert arrays of a layer (``w_gate``, ``w_up`` [E, D, F], ``w_down``
    [E, F, D] for glu; ``w_in`` [E, D, F], ``w_out`` [E, F, D] for mlp; biases ``b_*`` [E, F] / [E, D])."""
    ref = resolve_layer(model, layer)
    experts = get_in(model.params, (*ref.keys, "experts"))
    if not isinstance(experts, Mapping):
        raise ValueError(f"params: {ref.path}/experts: missing (a {ref.spec.layer!r} layer without stacked experts?)")
    return dict(experts)


def router_arrays(model: SurgeryModel, layer: LayerKey | MoELayerRef) -> dict[tuple[str, str], jax.Array]:
    """``{(collection, name): array}``: every per-expert array of a layer's router (its expert axis:
    :func:`router_expert_axis`): the scorer's parameters that have an ``'expert'`` axis (``('params', 'kernel')``
    [D, E_r] of a linear scorer, ``('moe_state', 'kernel')`` when frozen), ``('moe_state', 'selection_bias')`` and
    ``('moe_state', 'steer_offset')`` [E_r]. Scorer parameters shared by all experts are not included."""
    ref = resolve_layer(model, layer)
    out = {}
    for collection in ("params", "moe_state"):
        sub = get_in(model.variables.get(collection, {}), (*ref.keys, "router"))
        if isinstance(sub, Mapping):
            out.update({(collection, name): arr for name, arr in sub.items()
                        if router_expert_axis(ref, name) is not None})
    return out


def router_expert_axis(ref: MoELayerRef, name: str) -> int | None:
    """The ``'expert'`` axis of the layer's router array ``name``: from the scorer's parameter declaration, else
    0 for the router's per-expert state (``[E_r]``)."""
    router = ref.spec.router
    specs = router.scorer_options.params(1, ref.spec.num_routed)
    if name in specs:
        return specs[name].expert_axis
    return 0


def router_kernel(model: SurgeryModel, layer: LayerKey | MoELayerRef) -> jax.Array:
    """float[D, E_r]: the layer's router kernel (from ``params``, or ``moe_state`` for a frozen router)."""
    ref = resolve_layer(model, layer)
    arrays = router_arrays(model, ref)
    for collection in ("params", "moe_state"):
        if (collection, "kernel") in arrays:
            return arrays[(collection, "kernel")]
    raise ValueError(f"{ref.field}router.kind={ref.spec.router.kind!r}: {ref.path} has no router kernel (the kind "
                     f"routes without learned logits)")


def selection_bias(model: SurgeryModel, layer: LayerKey | MoELayerRef) -> jax.Array | None:
    """float32[E_r]: the layer's selection bias (``router.selection_bias``), or None."""
    return router_arrays(model, layer).get(("moe_state", "selection_bias"))


# ----------------------------------------------------------------------------- rewriting experts

class LayerUpdate(NamedTuple):
    """New routed experts of one layer.

    experts: ``{name: [E', ...]}`` with the layer's names and trailing shapes; router_kernel: float[D, E'_r]
    (``E'`` FFN experts, then the layer's zero-computation experts); selection_bias: float32[E'_r] (required when
    the layer has one and ``E'`` differs from ``E``; None keeps the old one when ``E' == E``); router: instead of
    the two, every per-expert router array (``{(collection, name): array}`` as :func:`router_arrays` returns them,
    each resized to ``E'_r`` on its expert axis), for scorers other than a linear kernel.
    """

    experts: Mapping[str, Any]
    router_kernel: Any
    selection_bias: Any = None
    router: Mapping[tuple[str, str], Any] | None = None


def _num_rows(arrays: Mapping[str, Any], what: str) -> int:
    sizes = {name: int(np.shape(a)[0]) if np.ndim(a) else None for name, a in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"{what}: every array must be stacked [E, ...] with the same E, got leading sizes {sizes}")
    return next(iter(sizes.values()))


def _check_layer_update(model: SurgeryModel, ref: MoELayerRef, update: LayerUpdate) -> int:
    """Validates ``update`` against the layer; returns the new ``E'``."""
    old = layer_experts(model, ref)
    new = dict(update.experts)
    if set(new) != set(old):
        raise ValueError(f"experts[{ref.path}]: names {sorted(new)}, the layer has {sorted(old)}")
    e_new = _num_rows(new, f"experts[{ref.path}]")
    for name, arr in new.items():
        if tuple(np.shape(arr))[1:] != tuple(np.shape(old[name]))[1:]:
            raise ValueError(f"experts[{ref.path}][{name!r}]: shape {tuple(np.shape(arr))}, expected "
                             f"[E', {', '.join(map(str, np.shape(old[name])[1:]))}]")
    routed = e_new + ref.spec.num_zero_computation
    if update.router is not None:
        for key, arr in router_arrays(model, ref).items():
            if key not in update.router:
                raise ValueError(f"router[{ref.path}]: no new value for {key[0]}/{key[1]}")
            want = list(np.shape(arr))
            want[router_expert_axis(ref, key[1])] = routed
            if list(np.shape(update.router[key])) != want:
                raise ValueError(f"router[{ref.path}][{key}]: shape {tuple(np.shape(update.router[key]))}, "
                                 f"expected {tuple(want)}")
        return e_new
    kernel = router_kernel(model, ref)
    if tuple(np.shape(update.router_kernel)) != (kernel.shape[0], routed):
        raise ValueError(f"router_kernel[{ref.path}]: shape {tuple(np.shape(update.router_kernel))}, expected "
                         f"[{kernel.shape[0]}, {routed}] (E'={e_new} experts + {ref.spec.num_zero_computation} "
                         f"zero-computation)")
    if update.selection_bias is not None and tuple(np.shape(update.selection_bias)) != (routed,):
        raise ValueError(f"selection_bias[{ref.path}]: shape {tuple(np.shape(update.selection_bias))}, expected "
                         f"[{routed}]")
    return e_new


def replace_experts(model: SurgeryModel, per_layer: Mapping[LayerKey, LayerUpdate | tuple]) -> SurgeryModel:
    """The model with new routed experts (and router) in the given layers, its config rewritten to match.

    ``per_layer``: ``{layer: LayerUpdate(experts [E', ...], router_kernel [D, E'_r], selection_bias [E'_r] or
    None)}`` (a plain 3-tuple works too); ``layer`` is a position among the MoE layers or a parameter path. The
    config's ``num_experts`` becomes ``E'``; ``router.k`` is clipped to ``E'_r`` (with a warning); a setting that no
    longer fits (``router.num_groups`` not dividing ``E'_r``) is a one-line error naming it. An ``LMConfig`` or
    ``ViTConfig`` has one MoE spec for all its MoE layers, so every MoE layer must end with the same ``E'``;
    an ``MLPConfig`` has one spec per layer. Other per-expert router arrays (an attention router's key/value
    kernels, steering offsets) are kept when ``E'`` equals ``E`` and are an error otherwise (nothing here says how
    they map onto the new experts; :func:`select_experts` maps every per-expert array).
    """
    refs: dict[str, MoELayerRef] = {}
    updates: dict[str, LayerUpdate] = {}
    for key, update in per_layer.items():
        ref = resolve_layer(model, key)
        check_sparse(ref, "replace_experts")
        refs[ref.path], updates[ref.path] = ref, LayerUpdate(*update)
    new_e = {path: _check_layer_update(model, refs[path], u) for path, u in updates.items()}
    config = config_with_experts(model.config, {refs[p].index: e for p, e in new_e.items()})
    variables = dict(model.variables)
    for path, update in updates.items():
        ref = refs[path]
        resized = new_e[path] != ref.spec.num_experts
        arrays = router_arrays(model, ref)
        for (collection, name), arr in arrays.items():
            if update.router is not None:
                value = jnp.asarray(update.router[(collection, name)], arr.dtype)
            elif name == "kernel":
                value = jnp.asarray(update.router_kernel, arr.dtype)
            elif name == "selection_bias" and update.selection_bias is not None:
                value = jnp.asarray(update.selection_bias, arr.dtype)
            elif not resized:
                continue
            else:
                raise ValueError(f"{collection}: {path}/router/{name} has one entry per expert and no new value was "
                                 f"given; use select_experts (or remove it first) to change this layer's experts")
            variables[collection] = set_in(variables[collection], (*ref.keys, "router", name), value)
        old = layer_experts(model, ref)
        experts = {name: jnp.asarray(arr, old[name].dtype) for name, arr in update.experts.items()}
        variables["params"] = set_in(variables["params"], (*ref.keys, "experts"), experts)
    return model.replace(config=config, variables=variables)


def select_experts(model: SurgeryModel, keep: Mapping[LayerKey, Sequence[int] | np.ndarray]) -> SurgeryModel:
    """The model keeping only the given experts of each listed layer, in the given order.

    ``keep``: ``{layer: int[E']}`` indices of the FFN experts to keep (distinct, in ``[0, E)``). Every per-expert
    array follows: the stacked experts ``[E, ...] -> [E', ...]``, and every router array's expert axis (the scorer's
    per-expert parameters, selection bias, steering offsets), whose zero-computation entries are kept after the FFN
    experts. The
    config is rewritten as by :func:`replace_experts`. Keeping no expert is an error naming ``num_experts``.
    """
    updates = {}
    for key, idx in keep.items():
        ref = resolve_layer(model, key)
        check_sparse(ref, "select_experts")
        updates[ref.path] = (ref, _check_keep(ref, idx))
    config = config_with_experts(model.config, {ref.index: len(idx) for ref, idx in updates.values()})
    variables = dict(model.variables)
    for path, (ref, idx) in updates.items():
        router, experts = subset_arrays(model, ref, idx)
        for (collection, name), arr in router.items():
            variables[collection] = set_in(variables[collection], (*ref.keys, "router", name), arr)
        variables["params"] = set_in(variables["params"], (*ref.keys, "experts"), experts)
    return model.replace(config=config, variables=variables)


def subset_arrays(model: SurgeryModel, layer: LayerKey | MoELayerRef, keep: Sequence[int] | np.ndarray
                  ) -> tuple[dict[tuple[str, str], jax.Array], dict[str, jax.Array]]:
    """(router arrays, experts) of a layer restricted to the FFN experts ``keep`` int[E'] (see :func:`router_arrays`,
    :func:`layer_experts`): router arrays keep the entries ``keep`` of their expert axis, then the zero-computation
    ones."""
    ref = resolve_layer(model, layer)
    idx = _check_keep(ref, keep)
    cols = np.concatenate([idx, np.arange(ref.spec.num_experts, ref.spec.num_routed)]).astype(np.int32)
    router = {}
    for (collection, name), arr in router_arrays(model, ref).items():
        axis = router_expert_axis(ref, name)
        if np.shape(arr)[axis] != ref.spec.num_routed:
            raise ValueError(f"{collection}: {ref.path}/router/{name} has shape {np.shape(arr)}; expected "
                             f"{ref.spec.num_routed} router outputs on its expert axis {axis}")
        router[(collection, name)] = jnp.take(jnp.asarray(arr), cols, axis=axis)
    experts = {name: jnp.asarray(arr)[idx] for name, arr in layer_experts(model, ref).items()}
    return router, experts


def check_remappable(ref: MoELayerRef, tool: str) -> None:
    """Refuses layers whose routing would change meaning when experts are removed or merged: routers without
    learned logits (hash, random: tokens would be re-hashed over the new experts), attention routers (their logits
    mix the expert columns) and gating residuals (the next layer adds this layer's logits, expert by expert)."""
    check_sparse(ref, tool)
    router = ref.spec.router
    if "learned" not in router.options.offers:
        raise ValueError(f"{ref.field}router.kind={router.kind!r}: routes without learned logits, so {tool} cannot "
                         f"remap its router ({ref.path})")
    if EXPERT_SLICES not in router.scorer_options.offers:
        raise ValueError(f"{ref.field}router.scorer={router.scorer!r}: each expert's logit depends on other "
                         f"experts' parameters (the scorer does not offer {EXPERT_SLICES!r}), so {tool} cannot remove "
                         f"or merge experts by slicing them ({ref.path})")
    if router.gating_residual:
        raise ValueError(f"{ref.field}router.gating_residual=True: the next MoE layer adds these logits expert by "
                         f"expert; {tool} does not remap them ({ref.path})")


def layer_variables(model: SurgeryModel, layer: LayerKey | MoELayerRef) -> dict[str, Any]:
    """``{'params': ..., 'moe_state': ...}`` of one MoE layer (what ``MoELayer(ref.spec).apply`` takes)."""
    ref = resolve_layer(model, layer)
    out = {}
    for collection in ("params", "moe_state"):
        sub = get_in(model.variables.get(collection, {}), ref.keys)
        if sub is not None:
            out[collection] = sub
    return out


def _check_keep(ref: MoELayerRef, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(idx)
    e = ref.spec.num_experts
    if arr.size == 0:
        raise ValueError(f"{ref.field}num_experts=0: {ref.path} would keep no expert (keep at least 1)")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"keep[{ref.path}]: must be a 1-D sequence of expert indices, got {idx!r}")
    if arr.min() < 0 or arr.max() >= e or len(set(arr.tolist())) != arr.size:
        raise ValueError(f"keep[{ref.path}]={arr.tolist()}: must be distinct expert indices in [0, {e})")
    return arr.astype(np.int32)


def config_with_experts(config: ModelConfig, new_experts: Mapping[int, int]) -> ModelConfig:
    """``config`` with ``num_experts`` of the MoE layers at the given layer indices (``{index: E'}``) changed.

    ``router.k`` is clipped to the new number of router outputs (logged); any other setting that no longer fits is
    a one-line error naming it (``model.moe.router.num_groups=4: must divide num_experts=6``). Shared-spec configs
    (``LMConfig``, ``ViTConfig``) need the same ``E'`` in every MoE layer (error naming ``model.moe.num_experts``).
    """
    refs = moe_layers(config)
    by_index = {r.index: r for r in refs}
    for i in new_experts:
        if i not in by_index:
            raise ValueError(f"layer index {i}: not an MoE layer of this model")
    if isinstance(config, MLPConfig):
        layers = list(config.layers)
        for i, e in new_experts.items():
            layers[i] = resized_spec(by_index[i], e)
        return dataclasses.replace(config, layers=tuple(layers))
    wanted = {r.path: new_experts.get(r.index, r.spec.num_experts) for r in refs}
    if len(set(wanted.values())) > 1:
        raise ValueError(f"model.moe.num_experts: {type(config).__name__} has one MoE spec for all its MoE layers, so "
                         f"every MoE layer needs the same number of experts; got {wanted}")
    e = next(iter(wanted.values()))
    if e == config.moe.num_experts:
        return config
    return dataclasses.replace(config, moe=resized_spec(refs[0], e))


def resized_spec(ref: MoELayerRef, num_experts: int) -> MoEConfig:
    """The layer's ``MoEConfig`` with ``num_experts`` FFN experts (``router.k`` clipped, logged; a setting that no
    longer fits is a one-line error prefixed with the layer's config field)."""
    spec = ref.spec
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"{ref.field}num_experts={num_experts!r}: {ref.path} would keep no expert "
                         f"(keep at least 1)")
    routed = int(num_experts) + spec.num_zero_computation
    try:
        router = spec.router
        if router.k > routed:
            log.warning("moejax.surgery: %srouter.k=%d clipped to %d: %s has %d router outputs left", ref.field,
                        router.k, routed, ref.path, routed)
            router = router.replace(k=routed)
        return dataclasses.replace(spec, num_experts=int(num_experts), router=router)
    except ValueError as e:
        raise ValueError(f"{ref.field}{e} (after changing {ref.path} to {num_experts} experts)") from None
