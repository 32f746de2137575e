"""Merging the experts of one MoE layer into fewer: M-SMoE (MC-SMoE's merge step) and its baselines.

Li et al. 2024, *Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy* (ICLR):
"conventional model merging methods fail to be effective in such expert merging for SMoE", because
"(1) redundant information overshadows critical experts; (2) appropriate neuron permutation for each expert is
missing to bring all of them in alignment". M-SMoE, as in the paper and the authors' code (UNITES-Lab/MC-SMoE,
``mcsmoe/merging/grouping.py``, ``permutation.py``):

1. **Dominant experts**: the ``G`` most frequently routed experts lead one group each (:func:`dominant_experts`).
2. **Group members**: every other expert joins the leader whose router logits are most similar to its own
   (:func:`group_experts`; the similarity is an input, e.g. the profile's logit similarity over a dataset, or
   :func:`router_similarity` of the router kernel when no data is at hand).
3. **Alignment**: each member's hidden neurons are permuted to match its leader's by weight matching
   (:func:`align`: the permutation of ``F`` maximising the summed inner products of the concatenated per-neuron
   weight vectors, i.e. minimising their summed squared distance, solved exactly by the Hungarian algorithm).
   A permutation of ``F`` does not change the function an expert computes, only which neuron sits where; the
   authors' code aligns to the group's lowest-index expert, we align to the leader, which the merge keeps.
4. **Merge**: each group becomes one expert, the frequency-weighted average of its (aligned) members.

Baselines (same grouping): ``average`` (no alignment, plain mean), ``frequency`` (no alignment, frequency
weights) and ``prune`` (keep the ``G`` leaders, drop the rest).

**Router.** MC-SMoE keeps the router's ``E`` outputs and binds every member's slot to the merged module, which a
moejax layer (one expert per router output) cannot express. The merged layer's router kernel therefore has ``G``
columns, and group ``g``'s column is its leader's column (``router_kernel[:, leaders[g]]``): the leader is the
expert the router picked most, so its logit is kept exactly and tokens that went to a leader keep their relative
logits among leaders; averaging columns would change the logits' scale and direction for every token, and a
frequency-weighted average still moves the dominant expert's decision boundary. The same choice makes ``prune``
the ordinary "keep the leaders" pruning. The rows a merge drops are reported in ``MergeResult.leaders`` so a
caller can slice any other per-expert router state (a selection bias, an attention router's keys) the same way.

Groups are numbered by their leader's index in the original layer (``leaders`` ascending), so ``num_groups = E``
returns the layer unchanged and the merged experts keep the original order.

All arrays here are host-side surgery: weights are read as numpy, combined in float64, and returned as jax arrays
of the input dtypes (the Hungarian algorithm runs on the host anyway).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

# Layout of the expert parameters (moejax.experts.ffn): which axis of each is the hidden axis F.
INPUT_MATRICES = ("w_in", "w_gate", "w_up")     # [..., D, F]: F is the last axis
OUTPUT_MATRICES = ("w_out", "w_down")           # [..., F, D]: F is the second-to-last axis
HIDDEN_BIASES = ("b_in", "b_gate", "b_up")      # [..., F]
OUTPUT_BIASES = ("b_out", "b_down")             # [..., D]: not tied to a hidden neuron
METHODS = ("msmoe", "average", "frequency", "prune")

Experts = Mapping[str, jax.Array]


class MergeResult(NamedTuple):
    """The merged layer.

    experts: ``{name: [G, ...]}``, the same keys and trailing shapes as the input experts.
    router_kernel: float[D, G], group ``g``'s column is ``router_kernel[:, leaders[g]]`` of the input.
    assignment: int32[E], the group of each original expert (``assignment[leaders[g]] == g``).
    leaders: int32[G], the original index of each group's dominant expert, ascending.
    """

    experts: dict[str, jax.Array]
    router_kernel: jax.Array
    assignment: jax.Array
    leaders: jax.Array


def hidden_axis(name: str) -> int | None:
    """The axis (counted from the end) of parameter ``name`` that indexes hidden neurons; None for output biases."""
    if name in INPUT_MATRICES or name in HIDDEN_BIASES:
        return -1
    if name in OUTPUT_MATRICES:
        return -2
    if name in OUTPUT_BIASES:
        return None
    raise ValueError(f"experts[{name!r}]: not an FFN expert parameter, expected one of "
                     f"{list(INPUT_MATRICES + OUTPUT_MATRICES + HIDDEN_BIASES + OUTPUT_BIASES)}")


def permute_neurons(expert: Experts, perm: jax.Array | np.ndarray) -> dict[str, jax.Array]:
    """One expert (or a stack) with its hidden neurons reordered: neuron ``i`` of the result is neuron ``perm[i]``.

    ``expert``: ``{name: [..., D, F] | [..., F, D] | [..., F] | [..., D]}``; ``perm``: int[F]. The FFN computes the
    same function (the activation acts per neuron), which is what makes alignment before merging legitimate.
    """
    perm = np.asarray(perm)
    out = {}
    for name, w in expert.items():
        axis = hidden_axis(name)
        out[name] = w if axis is None else jnp.take(jnp.asarray(w), perm, axis=axis)
    return out


def _neuron_features(expert: Experts) -> np.ndarray:
    """float64[F, n]: each hidden neuron's weights (its input column(s), its output row, its biases) as one vector."""
    parts = []
    for name in sorted(expert):
        axis = hidden_axis(name)
        if axis is None:
            continue
        w = np.asarray(expert[name], np.float64)
        parts.append(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1))
    if not parts:
        raise ValueError(f"expert: no parameter with a hidden axis among {sorted(expert)}")
    return np.concatenate(parts, axis=1)


def align(reference: Experts, other: Experts) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weight matching: the permutation of ``other``'s hidden neurons that best matches ``reference``'s.

    ``reference``, ``other``: ONE expert each, ``{name: array}`` without the expert axis (``w_gate`` [D, F],
    ``w_down`` [F, D], ``b_gate`` [F], ...), same keys and shapes. Each neuron is the concatenation of its weights
    in every parameter with a hidden axis (biases included); the returned ``perm`` int32[F] maximises
    ``sum_i <ref_i, other_perm[i]>`` (= minimises ``sum_i |ref_i - other_perm[i]|^2``: the norms do not depend on
    the permutation), found exactly with ``scipy.optimize.linear_sum_assignment``. Returns ``(perm,
    permute_neurons(other, perm))``, so that neuron ``i`` of the permuted expert is neuron ``perm[i]`` of ``other``.
    """
    if set(reference) != set(other):
        raise ValueError(f"other: keys {sorted(other)} differ from reference's {sorted(reference)}")
    for name in reference:
        if np.shape(reference[name]) != np.shape(other[name]):
            raise ValueError(f"other[{name!r}]: shape {np.shape(other[name])} differs from reference's "
                             f"{np.shape(reference[name])}")
    similarity = _neuron_features(reference) @ _neuron_features(other).T      # [F_ref, F_other]
    rows, perm = linear_sum_assignment(similarity, maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))                         # square problem: every row matched
    return jnp.asarray(perm, jnp.int32), permute_neurons(other, perm)


def router_similarity(router_kernel: jax.Array) -> jax.Array:
    """float32[E, E]: the cosine similarity of the router kernel's columns (``router_kernel``: float[D, E]).

    A data-free stand-in for M-SMoE's router-logit similarity: for inputs with identity second moment
    (``E[x x^T] = I``) the logits ``x @ kernel`` of experts ``i`` and ``j`` have exactly this cosine. A zero column
    is similar to nothing (0), itself included.
    """
    k = jnp.asarray(router_kernel, jnp.float32)
    if k.ndim != 2:
        raise ValueError(f"router_kernel: expected float[D, E], got shape {k.shape}")
    norm = jnp.linalg.norm(k, axis=0)
    unit = k / jnp.where(norm > 0, norm, 1.0)
    return unit.T @ unit


def _check_num_groups(num_groups: int, num_experts: int) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
            or not 1 <= num_groups <= num_experts:
        raise ValueError(f"num_groups={num_groups!r}: must be an integer in [1, {num_experts}] (the number of experts)")


def _check_frequency(frequency: jax.Array | np.ndarray) -> np.ndarray:
    f = np.asarray(frequency, np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"frequency: expected float[E] with E >= 1, got shape {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"frequency: must be finite and non-negative, got {f.tolist()}")
    return f


def dominant_experts(frequency: jax.Array | np.ndarray, num_groups: int) -> jax.Array:
    """int32[G]: the ``num_groups`` most frequently routed experts, ascending by index (ties: the lower index)."""
    f = _check_frequency(frequency)
    _check_num_groups(num_groups, f.size)
    top = np.argsort(-f, kind="stable")[:num_groups]
    return jnp.asarray(np.sort(top), jnp.int32)


def group_experts(frequency: jax.Array | np.ndarray, similarity: jax.Array | np.ndarray,
                  num_groups: int) -> jax.Array:
    """int32[E]: the group of every expert; group ``g`` is led by ``dominant_experts(frequency, num_groups)[g]``.

    ``frequency``: float[E] routing frequency (any non-negative scale); ``similarity``: float[E, E], row ``e`` the
    similarity of expert ``e`` to each expert. A non-leader joins the leader with the highest
    ``similarity[e, leader]`` (ties: the lower-index leader); a leader is in its own group.
    """
    f = _check_frequency(frequency)
    num_experts = f.size
    _check_num_groups(num_groups, num_experts)
    s = np.asarray(similarity, np.float64)
    if s.shape != (num_experts, num_experts):
        raise ValueError(f"similarity: expected float[E, E] with E={num_experts}, got shape {s.shape}")
    leaders = np.asarray(dominant_experts(f, num_groups))
    assignment = np.argmax(s[:, leaders], axis=1)
    assignment[leaders] = np.arange(num_groups)     # a leader leads its own group whatever its similarities
    return jnp.asarray(assignment, jnp.int32)


def _group_weights(method: str, frequency: np.ndarray) -> np.ndarray:
    """float64[n]: the merge weights of a group's members (summing to 1)."""
    if method == "average":
        return np.full(frequency.size, 1.0 / frequency.size)
    total = frequency.sum()
    if total == 0:      # no member was ever routed: no evidence to prefer one, fall back to the plain mean
        return np.full(frequency.size, 1.0 / frequency.size)
    return frequency / total


def _num_experts(experts: Experts) -> int:
    if not experts:
        raise ValueError("experts: empty")
    sizes = {name: np.shape(w)[0] if np.ndim(w) else None for name, w in experts.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"experts: every array must be stacked [E, ...] with the same E, got leading sizes {sizes}")
    return next(iter(sizes.values()))


def merge_layer(experts: Experts, router_kernel: jax.Array | None, frequency: jax.Array, router_similarity: jax.Array,
                num_groups: int, *, method: str = "msmoe") -> MergeResult:
    """Merges a layer's ``E`` experts into ``G = num_groups``.

    experts: ``{name: [E, ...]}`` stacked expert parameters (``glu``: ``w_gate``, ``w_up`` [E, D, F], ``w_down``
    [E, F, D], optional ``b_gate``, ``b_up`` [E, F], ``b_down`` [E, D]; ``mlp``: ``w_in``, ``w_out``, ``b_in``,
    ``b_out``); router_kernel: float[D, E] or None (the result then has none: take the leaders' entries of every
    per-expert router array, :func:`moejax.surgery.subset_arrays`); frequency: float[E] routing frequency; router_similarity:
    float[E, E]; method: ``msmoe`` (align members to their leader, frequency-weighted average), ``frequency``
    (frequency-weighted, no alignment), ``average`` (plain mean, no alignment), ``prune`` (the leaders alone).
    Groups come from :func:`group_experts`; the router keeps each group's leader column (module docstring).
    A group whose members all have zero frequency is averaged plainly. Returns a :class:`MergeResult`.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {list(METHODS)}")
    num_experts = _num_experts(experts)
    kernel = None if router_kernel is None else jnp.asarray(router_kernel)
    if kernel is not None and (kernel.ndim != 2 or kernel.shape[1] != num_experts):
        raise ValueError(f"router_kernel: expected float[D, E] with E={num_experts}, got shape {kernel.shape}")
    f = _check_frequency(frequency)
    if f.size != num_experts:
        raise ValueError(f"frequency: expected float[E] with E={num_experts}, got shape {f.shape}")
    _check_num_groups(num_groups, num_experts)
    if method == "msmoe":
        for name in experts:
            hidden_axis(name)              # fail before any work on a parameter alignment cannot permute
    assignment = np.asarray(group_experts(f, router_similarity, num_groups))
    leaders = np.asarray(dominant_experts(f, num_groups))

    host = {name: np.asarray(w) for name, w in experts.items()}

    def expert(e: int) -> dict[str, np.ndarray]:
        return {name: w[e] for name, w in host.items()}

    merged: dict[str, list[np.ndarray]] = {name: [] for name in host}
    for g, leader in enumerate(leaders):
        if method == "prune":
            members, weights = np.array([leader]), np.ones(1)
        else:
            members = np.flatnonzero(assignment == g)
            weights = _group_weights(method, f[members])
        parts = []
        for e in members:
            p = expert(e)
            if method == "msmoe" and e != leader:
                p = {name: np.asarray(w) for name, w in align(expert(leader), p)[1].items()}
            parts.append(p)
        for name in host:
            # float64 accumulation: identical members (weights summing to 1) round back to the exact input.
            acc = sum(w * part[name].astype(np.float64) for w, part in zip(weights, parts))
            merged[name].append(acc)
    out = {name: jnp.asarray(np.stack(ws).astype(host[name].dtype)) for name, ws in merged.items()}
    return MergeResult(experts=out, router_kernel=None if kernel is None else kernel[:, leaders], assignment=jnp.asarray(assignment, jnp.int32),
                       leaders=jnp.asarray(leaders, jnp.int32))
