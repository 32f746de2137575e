"""MC-SMoE's pipeline on a trained moejax LM: calibrate, merge (two router forms), fine-tune, compress, account.

The merge and compression arithmetic is the library's (:mod:`moejax.surgery.merge`, :mod:`moejax.surgery.compress`);
what is specific to reproducing the paper lives here:

* **Calibration** (:func:`calibrate`): per MoE layer, the routing frequency of each expert (token copies, top-2)
  and the similarity of experts' router logits over the same tokens, as the authors' code measures it
  (``mcsmoe/merging/grouping.py``, ``similarity_base="router-logits"``: the cosine of two experts' logit columns
  over all calibration tokens). The library's profile offers the router *kernel's* column cosine, a data-free
  stand-in; the paper groups by data.
* **Two router forms of a merged layer** (:func:`merged_variables`). ``bound``: the paper's form: the router keeps
  its E outputs and every member's output is bound to its group's merged expert (the authors' code replaces the
  member module by the merged one), which a moejax layer expresses as E expert slots holding copies of G distinct
  experts, ``experts_E = merged_G[assignment]``; memory is counted for the G distinct ones. ``drop``: the
  library's :func:`moejax.surgery.replace_experts` form, a G-expert layer whose router keeps each group leader's
  column, so tokens choose among G experts; for ``prune`` this is ordinary expert pruning.
* **Fine-tuning** (:func:`finetune`): the authors fine-tune after merging and after compressing with the router
  frozen and a distillation term from the unmerged model (``SwitchTransformersWrapperForDistillation``: task loss
  + ``kd_lambda`` * KL(teacher || student) at temperature ``kd_temperature``, ``kd_lambda=0.2``, T=2). Here the
  trainable parameters are a *parameterisation* (:class:`Parameterised`): everything but the merged experts as is,
  plus the G merged experts as dense ``[G, ...]`` stacks or as low-rank / shared-basis factors, expanded to the
  model's ``[E, ...]`` slots in the forward pass, so bound copies stay one expert and factors stay factors.
* **Accounting** (:func:`stored_params`, :func:`flops_per_token`): parameters stored and forward FLOPs per token
  (2 per multiply-add) of each form.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.surgery.compress import shared_basis_factors
from moejax.surgery.merge import INPUT_MATRICES, OUTPUT_MATRICES, merge_layer

Params = Mapping[str, Any]


# ----------------------------------------------------------------------------- tree helpers

def get_in(tree: Any, keys: Sequence[str]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def set_in(tree: Mapping[str, Any], keys: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``tree[k0]...[kn] = value`` (only the dicts along the path are copied)."""
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else set_in(tree[keys[0]], keys[1:], value)
    return out


def moe_paths(model_config: Any) -> list[str]:
    """The parameter paths of the MoE layers (``decoder/block_i/ffn``) of a typed LM config."""
    from moejax.surgery import moe_layers
    return [ref.path for ref in moe_layers(model_config)]


# ----------------------------------------------------------------------------- calibration

@dataclasses.dataclass
class Calibration:
    """Per MoE layer path: ``frequency`` float64[E] (token copies / all copies) and ``similarity`` float64[E, E]
    (cosine of the router-logit columns over the calibration tokens)."""

    frequency: dict[str, np.ndarray]
    similarity: dict[str, np.ndarray]
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "frequency": {p: np.round(f, 6).tolist() for p, f in self.frequency.items()}}


def _router_outputs(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{layer path: router output}`` from a captured ``intermediates`` tree (``.../ffn/router/__call__``)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if key == "router" and isinstance(value, Mapping) and "__call__" in value:
            out[prefix] = value["__call__"][0]
        elif isinstance(value, Mapping):
            out.update(_router_outputs(value, path))
    return out


def calibrate(model, variables: Params, batches: Iterable[Mapping[str, Any]], num_experts: int) -> Calibration:
    """Routing frequencies and router-logit similarities of every MoE layer over the tokens of ``batches``
    (LM batches ``{"tokens": int[B, L+1], "mask": [B, L]}``; masked-out tokens are ignored)."""
    from moejax.routing import Router

    @jax.jit
    def forward(tokens):
        _, state = model.apply(variables, tokens, deterministic=True, mutable=["intermediates"],
                               capture_intermediates=lambda mdl, method: isinstance(mdl, Router)
                               and method == "__call__")
        outs = _router_outputs(state["intermediates"])
        # Router(..., return_logits=True) returns (routing, logits): logits float32[T, E], expert_index [T, K].
        return {p: (o[1], o[0].expert_index, o[0].valid) for p, o in outs.items()}

    gram: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    n = 0
    for batch in batches:
        tokens = np.asarray(batch["tokens"])[:, :-1]
        keep = np.asarray(batch.get("mask", np.ones(tokens.shape)), bool).reshape(-1)
        for path, (logits, index, valid) in forward(jnp.asarray(tokens)).items():
            lg = np.asarray(logits, np.float64).reshape(-1, num_experts)[keep]
            idx = np.asarray(index).reshape(-1, np.shape(index)[-1])
            ok = np.broadcast_to(np.asarray(valid, bool), idx.shape).reshape(idx.shape) & keep[:, None]
            gram[path] = gram.get(path, 0.0) + lg.T @ lg
            c = np.bincount(idx[ok], minlength=num_experts)[:num_experts]
            counts[path] = counts.get(path, 0) + c
        n += int(keep.sum())
    freq, sim = {}, {}
    for path, g in gram.items():
        norm = np.sqrt(np.clip(np.diag(g), 1e-30, None))
        sim[path] = g / np.outer(norm, norm)
        freq[path] = counts[path] / max(int(counts[path].sum()), 1)
    return Calibration(freq, sim, n)


# ----------------------------------------------------------------------------- merging

@dataclasses.dataclass
class Merged:
    """One merge of every MoE layer: per path the library's ``MergeResult`` (G experts, leader router columns,
    ``assignment`` int[E], ``leaders`` int[G])."""

    method: str
    groups: int
    layers: dict[str, Any]

    def assignments(self) -> dict[str, list[int]]:
        return {p: np.asarray(r.assignment).tolist() for p, r in self.layers.items()}


def merge_all(params: Params, paths: Sequence[str], calib: Calibration, groups: int, method: str) -> Merged:
    """:func:`moejax.surgery.merge.merge_layer` on every MoE layer, grouped by frequency and router-logit
    similarity."""
    out = {}
    for path in paths:
        layer = get_in(params, path.split("/"))
        out[path] = merge_layer(layer["experts"], layer["router"]["kernel"], calib.frequency[path],
                                calib.similarity[path], groups, method=method)
    return Merged(method, groups, out)


def merged_variables(model_config: Any, variables: Params, merged: Merged, form: str) -> tuple[Any, dict]:
    """(typed model config, variables) of the merged model in router form ``bound`` or ``drop`` (module docstring)."""
    if form == "bound":
        params = variables["params"]
        for path, r in merged.layers.items():
            idx = np.asarray(r.assignment)
            experts = {name: jnp.asarray(w)[idx] for name, w in r.experts.items()}
            params = set_in(params, (*path.split("/"), "experts"), experts)
        return model_config, {**variables, "params": params}
    if form == "drop":
        from moejax.surgery import LayerUpdate, SurgeryModel, replace_experts
        model = SurgeryModel(model_config, dict(variables))
        new = replace_experts(model, {p: LayerUpdate(r.experts, r.router_kernel) for p, r in merged.layers.items()})
        return new.config, dict(new.variables)
    raise ValueError(f"form={form!r}: must be 'bound' or 'drop'")


# ----------------------------------------------------------------------------- parameterisations

def low_rank_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(A float32[G, a, r], B float32[G, r, b])`` with ``A @ B`` the best rank-``r`` approximation of each
    ``w[g]`` (truncated SVD, the singular values split evenly between the factors)."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def factorise(experts: Mapping[str, jax.Array], kind: str, rank: int | None) -> dict[str, Any]:
    """Trainable factors of a layer's G experts: ``dense`` (the stacks), ``low_rank`` or ``shared_basis``."""
    if kind == "dense":
        return {name: jnp.asarray(w) for name, w in experts.items()}
    mats = {n: w for n, w in experts.items() if np.ndim(w) == 3}
    rest = {n: jnp.asarray(w) for n, w in experts.items() if np.ndim(w) != 3}
    if kind == "low_rank":
        return {**rest, **{n: low_rank_factors(w, rank) for n, w in mats.items()}}
    if kind == "shared_basis":
        return {**rest, **{n: tuple(f) for n, f in shared_basis_factors(mats, rank).items()}}
    raise ValueError(f"kind={kind!r}: must be dense, low_rank or shared_basis")


def expand(factors: Mapping[str, Any], kind: str) -> dict[str, jax.Array]:
    """The dense ``[G, ...]`` expert stacks of :func:`factorise`'s factors."""
    out = {}
    for name, f in factors.items():
        if not isinstance(f, tuple):
            out[name] = f
        elif kind == "low_rank":
            out[name] = f[0] @ f[1]
        else:                                   # shared_basis: (basis [D, r], coefficients [G, r, F])
            dense = jnp.einsum("dr,grf->gdf", *f)
            out[name] = jnp.swapaxes(dense, 1, 2) if name in OUTPUT_MATRICES else dense
    return out


@dataclasses.dataclass
class Parameterised:
    """A merged model's trainable form: ``trainable = {"rest": params without the MoE layers' experts, "experts":
    {path: factors}}``; :meth:`params` expands it into the model's parameter tree, the layer's expert slots reading
    ``index[path]`` int[E_slots] of the G experts (the assignment for ``bound``, ``arange(G)`` for ``drop``)."""

    kind: str
    rank: int | None
    index: dict[str, np.ndarray]
    trainable: dict[str, Any]

    @classmethod
    def build(cls, params: Params, experts: Mapping[str, Mapping[str, Any]], index: Mapping[str, np.ndarray],
              kind: str = "dense", rank: int | None = None) -> "Parameterised":
        rest = params
        for path in experts:
            rest = set_in(rest, (*path.split("/"), "experts"), {})
        factors = {p: factorise(e, kind, rank) for p, e in experts.items()}
        return cls(kind, rank, {p: np.asarray(i) for p, i in index.items()}, {"rest": rest, "experts": factors})

    def params(self, trainable: Mapping[str, Any] | None = None,
               index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The model's parameter tree; ``trainable`` and ``index`` default to this object's (a jitted caller passes
        them as arguments, so that one compilation serves every grouping of the same shapes)."""
        t = self.trainable if trainable is None else trainable
        index = self.index if index is None else index
        params = t["rest"]
        for path, f in t["experts"].items():
            dense = expand(f, self.kind)
            params = set_in(params, (*path.split("/"), "experts"), {n: w[index[path]] for n, w in dense.items()})
        return params

    def experts(self) -> dict[str, dict[str, jax.Array]]:
        """The G distinct experts of each layer, dense."""
        return {p: expand(f, self.kind) for p, f in self.trainable["experts"].items()}

    def num_expert_params(self) -> int:
        """Parameters stored for the experts (the G distinct experts, as factors where factorised)."""
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.trainable["experts"])))


# ----------------------------------------------------------------------------- fine-tuning

def _is_router(path: tuple) -> bool:
    return any(getattr(k, "key", None) == "router" for k in path)


def finetune(student, teacher, teacher_variables: Params, state: Params, model: Parameterised,
             batches: Callable[[int], Mapping[str, Any]], start: int, settings: Mapping[str, Any]) -> Parameterised:
    """``settings["steps"]`` AdamW steps on ``batches(start + i)`` (the training stream after training), the
    router frozen: loss = next-byte cross-entropy + ``kd_lambda`` * KL(teacher || student) per token at temperature
    ``kd_temperature`` (the authors' recipe; their Adam betas (0.9, 0.98), eps 1e-6, weight decay 0.01, linear
    warmup then linear decay). ``student`` / ``teacher``: flax modules; ``state``: the student's non-param
    collections. Returns the fine-tuned parameterisation (a new object; ``model`` is unchanged)."""
    import optax

    steps = int(settings["steps"])
    if steps <= 0:
        return model
    step, tx = _finetune_step(student, teacher, model, tuple(sorted(settings.items())))
    index = {p: jnp.asarray(i, jnp.int32) for p, i in model.index.items()}
    trainable, opt_state = model.trainable, tx.init(model.trainable)
    for i in range(steps):
        batch = batches(start + i)
        tokens = np.asarray(batch["tokens"])
        mask = batch.get("mask")            # training batches are all real tokens; eval batches carry a mask
        mask = np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32) if mask is None else np.asarray(mask)
        trainable, opt_state, loss = step(trainable, opt_state, index, teacher_variables, state,
                                          jnp.asarray(tokens), jnp.asarray(mask))
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"fine-tuning: non-finite loss at step {i}")
    return dataclasses.replace(model, trainable=trainable)


_STEPS: dict[tuple, tuple] = {}


def _finetune_step(student, teacher, model: Parameterised, settings: tuple):
    """(jitted step, optimiser) of :func:`finetune`, cached by what the traced program's structure depends on (the
    modules, the parameterisation's kind and rank, the settings; shapes are jit's business, the slot index is an
    argument), so that fine-tunings of the same shapes (the control's two, the bound merges of one G) share it.
    The cached step keeps its modules alive, so their ``id`` cannot be reused by another module."""
    import optax

    key = (id(student), id(teacher), model.kind, model.rank, settings)
    if key in _STEPS:
        return _STEPS[key]
    settings = dict(settings)
    steps = int(settings["steps"])
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, settings["learning_rate"], max(int(settings["warmup_steps"]), 1)),
        optax.linear_schedule(settings["learning_rate"], 0.0, max(steps - int(settings["warmup_steps"]), 1))],
        [max(int(settings["warmup_steps"]), 1)])
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if _is_router(p) else "train", model.trainable)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"train": optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01),
         "frozen": optax.set_to_zero()}, labels))
    temp, lam = float(settings["kd_temperature"]), float(settings["kd_lambda"])

    def loss_fn(trainable, index, teacher_variables, state, tokens, mask):
        logits, _ = student.apply({**state, "params": model.params(trainable, index)}, tokens[:, :-1],
                                  deterministic=True)
        t_logits, _ = teacher.apply(teacher_variables, tokens[:, :-1], deterministic=True)
        t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
        logits = logits.astype(jnp.float32)
        m = mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(m), 1.0)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
        p_t = jax.nn.softmax(t_logits / temp)
        kl = jnp.sum(p_t * (jax.nn.log_softmax(t_logits / temp) - jax.nn.log_softmax(logits / temp)), axis=-1)
        return jnp.sum(ce * m) / count + lam * jnp.sum(kl * m) / count

    @jax.jit
    def step(trainable, opt_state, index, teacher_variables, state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, index, teacher_variables, state, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    _STEPS[key] = (step, tx)
    return step, tx


# ----------------------------------------------------------------------------- accounting

def stored_params(total_full: int, num_layers: int, experts_full_per_layer: int, experts_stored: int,
                  router_columns_dropped: int, d_model: int) -> int:
    """Parameters stored by a surgered model: the full model's, minus every MoE layer's full expert stack, plus
    the experts it stores (G distinct experts or their factors), minus the router columns it dropped (``drop``
    form). The ``bound`` form's expert-slot index (E small integers per layer) is not counted."""
    return total_full - num_layers * experts_full_per_layer + experts_stored - router_columns_dropped * d_model


def expert_flops(d: int, f: int, k: int, kind: str, rank: int | None) -> int:
    """Forward FLOPs per token of one MoE layer's experts (two matrices [D, F] and [F, D], ``k`` experts)."""
    if kind == "dense":
        return k * 2 * (2 * d * f)
    if kind == "low_rank":
        return k * 2 * (2 * rank * (d + f))
    if kind == "shared_basis":
        # x U once per token [D -> r], then per chosen expert [r -> F] and [F -> r], then the lift [r -> D] once.
        return 2 * d * rank + k * 2 * rank * f + k * 2 * f * rank + 2 * rank * d
    raise ValueError(f"kind={kind!r}")


def flops_per_token(d: int, layers: int, seq_len: int, vocab: int, router_outputs: int, f: int, k: int,
                    kind: str = "dense", rank: int | None = None) -> int:
    """Forward FLOPs per token of the LM: per block the Q/K/V/O projections ``2 * 4 D^2``, causal attention scores
    and values ``2 * 2 D (L+1)/2`` on average over positions, the router ``2 D E_r`` and the experts
    (:func:`expert_flops`); plus the tied output projection ``2 D V``. Norms, softmaxes and activations omitted."""
    attention = 2 * 4 * d * d + 2 * 2 * d * (seq_len + 1) // 2
    block = attention + 2 * d * router_outputs + expert_flops(d, f, k, kind, rank)
    return layers * block + 2 * d * vocab
