"""Expert profiles: how a model's MoE layers route a dataset, per layer and expert.

Per MoE layer (``E_r`` router outputs, ``K`` slots per token, ``T`` profiled tokens):

* ``counts`` int[E_r]: token copies routed to each expert (one per token that chose it);
* ``frequency`` float[E_r]: ``counts / counts.sum()`` (sums to 1; what ``moejax.lm_eval`` reports);
* ``activation_rate`` float[E_r]: ``counts / T``, the fraction of tokens that use each expert (sums to ``K``
  with a fixed-k router; SteerMoE's activation rate);
* ``mean_gate`` float[E_r]: the mean combine weight of the copies an expert received (0 where it got none);
* ``coactivation`` int[E_r, E_r]: tokens that use both ``i`` and ``j``; symmetric, its diagonal is ``counts``;
* ``router_similarity`` float[E_r, E_r]: cosine similarity of the router kernel's columns (None for routers
  without a kernel): experts the router scores alike, the grouping signal of expert merging;
* optionally the counts, frequencies and mean gates per label (a class of the example, or a token class).

The statistics come from the ``routing`` collection that token-choice MoE layers record
(:class:`~moejax.layers.MoELayer`), so they are exactly what the forward pass routed (before any capacity drop).
Data: LM token windows cut from a text (:func:`text_batches`), arrays (:func:`array_batches`) or the evaluation
split of the workdir's own data config (:func:`eval_batches`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.generation.evaluate import routing_paths
from moejax.models.build import build_model
from moejax.surgery.model import SurgeryModel, check_sparse, moe_layers, router_arrays

log = logging.getLogger("moejax")

Labeler = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs with what marks them real and their labels.

    inputs: int32[B, L] tokens (LM) or float[B, ...] examples (classifiers); mask: None (all real), float/bool[B] per
    example or [B, L] per token; labels: None, int[B] per example or int[B, L] per token.
    """

    inputs: np.ndarray
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None


# ----------------------------------------------------------------------------- data

def array_batches(inputs: np.ndarray, *, batch_size: int = 8, mask: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> list[Batch]:
    """``inputs`` [N, ...] cut into batches of ``batch_size``; the last one padded (mask 0) so that every batch has
    one shape (one compilation)."""
    inputs = np.asarray(inputs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs: need at least one example, got shape {inputs.shape}")
    n = inputs.shape[0]
    mask = np.ones((n,), np.float32) if mask is None else np.asarray(mask, np.float32)
    pad = (-n) % batch_size

    def padded(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

    inputs, mask, labels = padded(inputs), padded(mask), padded(None if labels is None else np.asarray(labels))
    return [Batch(inputs[i:i + batch_size], mask[i:i + batch_size],
                  None if labels is None else labels[i:i + batch_size]) for i in range(0, n + pad, batch_size)]


def text_batches(token_ids: Sequence[int], *, length: int = 128, max_windows: int | None = 64,
                 batch_size: int = 8) -> list[Batch]:
    """LM batches int32[B, L] of non-overlapping windows of ``L = length`` tokens of one token stream (at most
    ``max_windows``; the tail shorter than a window is dropped; an error naming ``length`` when none fits)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r}: must be an integer >= 1")
    stream = np.asarray(token_ids, np.int32)
    n = len(stream) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"length={length}: the text has {len(stream)} tokens, fewer than one window")
    return array_batches(stream[:n * length].reshape(n, length), batch_size=batch_size)


def eval_batches(experiment: Mapping[str, Any], *, max_batches: int | None = None) -> Iterator[Batch]:
    """The evaluation split of a workdir's data config (``data`` section), as the trainer evaluates it: LM inputs
    int32[B, L] with their mask, or classifier inputs with their mask and class labels."""
    from moejax.data import from_config
    pipeline = from_config(experiment["data"])
    for i, batch in enumerate(pipeline.eval):
        if max_batches is not None and i >= max_batches:
            return
        if pipeline.meta.task == "lm":
            yield Batch(np.asarray(batch["tokens"])[:, :-1], np.asarray(batch["mask"]))
        else:
            yield Batch(np.asarray(batch["inputs"]), np.asarray(batch["mask"]), np.asarray(batch["labels"]))


# ----------------------------------------------------------------------------- the forward pass

@functools.partial(jax.jit, static_argnums=0)
def forward_with_routing(config: Any, variables: Any, x: jax.Array
                         ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """(the model's output, ``{layer path: (expert_index int32[..., K], weight float32[..., K])}``) of a
    deterministic forward pass of the model of ``config`` (static: every caller with the same config and input shape
    shares one compilation)."""
    out, state = build_model(config).apply(variables, x, deterministic=True, mutable=["routing"])
    routed = {p: (r["expert_index"][0], r["weight"][0]) for p, r in routing_paths(state.get("routing", {})).items()}
    return out[0], routed


def routing_fn(model: SurgeryModel) -> Callable[[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A function ``inputs -> {layer path: (expert_index int32[..., K], weight float32[..., K])}``: what each
    token-choice MoE layer routed in a deterministic forward pass (jitted once per config and input shape)."""
    variables = {k: v for k, v in model.variables.items() if k != "routing"}

    def run(inputs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        _, out = forward_with_routing(model.config, variables, jnp.asarray(inputs))
        return {p: (np.asarray(i), np.asarray(w)) for p, (i, w) in out.items()}

    return run


# ----------------------------------------------------------------------------- statistics

@dataclasses.dataclass
class Counts:
    """Sums over tokens for one layer (and one label): tokens, counts int[E_r], gate_sum float[E_r]."""

    tokens: int
    counts: np.ndarray
    gate_sum: np.ndarray

    @property
    def frequency(self) -> np.ndarray:
        return self.counts / max(int(self.counts.sum()), 1)

    @property
    def activation_rate(self) -> np.ndarray:
        return self.counts / max(self.tokens, 1)

    @property
    def mean_gate(self) -> np.ndarray:
        return np.where(self.counts > 0, self.gate_sum / np.maximum(self.counts, 1), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "counts": self.counts.tolist(), "frequency": _round(self.frequency),
                "activation_rate": _round(self.activation_rate), "mean_gate": _round(self.mean_gate)}


def _round(x: np.ndarray) -> list:
    return np.round(np.asarray(x, np.float64), 6).tolist()


@dataclasses.dataclass
class LayerProfile:
    """The profile of one MoE layer (see the module docstring); ``num_routed`` is ``E_r``."""

    path: str
    num_routed: int
    total: Counts
    coactivation: np.ndarray
    router_similarity: np.ndarray | None
    by_label: dict[int, Counts] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # frequency, activation_rate, mean_gate, counts, tokens: the totals'
        if name in ("tokens", "counts", "gate_sum", "frequency", "activation_rate", "mean_gate"):
            return getattr(self.total, name)
        raise AttributeError(name)

    def to_json(self) -> dict[str, Any]:
        out = {"num_routed": self.num_routed, **self.total.to_json(), "coactivation": self.coactivation.tolist(),
               "router_similarity": None if self.router_similarity is None else _round(self.router_similarity)}
        if self.by_label:
            out["by_label"] = {str(k): v.to_json() for k, v in sorted(self.by_label.items())}
        return out


@dataclasses.dataclass
class Profile:
    """Per-layer profiles keyed by layer path, in layer order."""

    layers: dict[str, LayerProfile]

    def __getitem__(self, path: str) -> LayerProfile:
        return self.layers[path]

    def to_json(self) -> dict[str, Any]:
        return {"layers": {p: lp.to_json() for p, lp in self.layers.items()}}

    def frequencies(self) -> dict[str, np.ndarray]:
        return {p: lp.frequency for p, lp in self.layers.items()}


def cosine_similarity(kernel: jax.Array | np.ndarray) -> np.ndarray:
    """float[E, E]: cosine similarity of the columns of ``kernel`` [D, E] (a zero column is similar to nothing)."""
    k = np.asarray(kernel, np.float64)
    norm = np.linalg.norm(k, axis=0)
    unit = k / np.where(norm > 0, norm, 1.0)
    return unit.T @ unit


def router_similarity(model: SurgeryModel, ref: Any) -> np.ndarray | None:
    """float[E_r, E_r]: cosine similarity of the experts' router parameters (each expert's slices of the scorer's
    per-expert parameters, concatenated; the kernel's columns for a linear scorer), or None for a router without
    learned parameters (hash, random)."""
    if "learned" not in ref.spec.router.options.offers:
        return None
    specs = ref.spec.router.scorer_options.params(1, ref.spec.num_routed)
    columns = []                                           # each [*, E_r]: one column of parameters per expert
    for (_, name), arr in router_arrays(model, ref).items():
        if name in specs:
            moved = np.moveaxis(np.asarray(arr, np.float64), specs[name].expert_axis, -1)
            columns.append(moved.reshape(-1, moved.shape[-1]))
    return cosine_similarity(np.concatenate(columns, axis=0)) if columns else None


def token_stats(expert_index: np.ndarray, weight: np.ndarray, keep: np.ndarray, num_routed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts int64[E_r], gate sums float64[E_r], co-activation int64[E_r, E_r]) of the kept tokens.

    expert_index int[T, K] (-1: empty slot), weight float[T, K], keep bool[T]."""
    onehot = (expert_index[..., None] == np.arange(num_routed)) & keep[:, None, None]     # [T, K, E_r]
    uses = onehot.any(axis=1).astype(np.int64)                                            # [T, E_r]
    counts = onehot.sum(axis=(0, 1)).astype(np.int64)
    gates = (onehot * weight[..., None].astype(np.float64)).sum(axis=(0, 1))
    return counts, gates, uses.T @ uses


def _per_token(a: np.ndarray | None, lead: tuple[int, ...], what: str) -> np.ndarray | None:
    """``a`` (per example [B] or per token [B, L]) broadcast to the routed tokens' leading shape, flattened."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.shape == lead[:a.ndim]:
        a = a.reshape(a.shape + (1,) * (len(lead) - a.ndim))
        return np.broadcast_to(a, lead).reshape(-1)
    raise ValueError(f"{what}: shape {a.shape} does not match the routed tokens' shape {lead} (per example or "
                     f"per token)")


def profile_experts(model: SurgeryModel, batches: Iterable[Batch], *, labeler: Labeler | None = None) -> Profile:
    """The routing profile of every sparse MoE layer of ``model`` over ``batches``.

    ``labeler``: ``inputs -> labels`` (per example or per token, e.g. a token class of LM inputs); without it the
    batches' own ``labels`` (a classifier's classes) break the counts down when present.
    """
    refs = moe_layers(model)
    if not refs:
        raise ValueError("model: has no MoE layer to profile")
    for ref in refs:
        check_sparse(ref, "profile")
    route = routing_fn(model)
    totals = {r.path: Counts(0, np.zeros(r.spec.num_routed, np.int64), np.zeros(r.spec.num_routed)) for r in refs}
    co = {r.path: np.zeros((r.spec.num_routed,) * 2, np.int64) for r in refs}
    by_label: dict[str, dict[int, Counts]] = {r.path: {} for r in refs}
    seen = False
    for batch in batches:
        seen = True
        routed = route(batch.inputs)
        labels = labeler(batch.inputs) if labeler is not None else batch.labels
        for ref in refs:
            if ref.path not in routed:
                raise ValueError(f"{ref.field}router.kind={ref.spec.router.kind!r}: {ref.path} records no token-choice "
                                 f"routing (expert-choice routers are not profiled)")
            idx, w = routed[ref.path]
            lead = idx.shape[:-1]
            keep = np.ones(int(np.prod(lead)), bool) if batch.mask is None \
                else _per_token(batch.mask, lead, "mask") > 0
            idx, w = idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])
            counts, gates, pairs = token_stats(idx, w, keep, ref.spec.num_routed)
            t = totals[ref.path]
            t.tokens, t.counts, t.gate_sum = t.tokens + int(keep.sum()), t.counts + counts, t.gate_sum + gates
            co[ref.path] += pairs
            tok_labels = _per_token(labels, lead, "labels")
            if tok_labels is None:
                continue
            for label in np.unique(tok_labels[keep]):
                sel = keep & (tok_labels == label)
                c, g, _ = token_stats(idx, w, sel, ref.spec.num_routed)
                entry = by_label[ref.path].setdefault(int(label), Counts(0, np.zeros_like(c), np.zeros_like(g)))
                entry.tokens, entry.counts, entry.gate_sum = entry.tokens + int(sel.sum()), entry.counts + c, \
                    entry.gate_sum + g
    if not seen:
        raise ValueError("batches: empty (nothing to profile)")
    layers = {}
    for ref in refs:
        sim = router_similarity(model, ref)
        layers[ref.path] = LayerProfile(ref.path, ref.spec.num_routed, totals[ref.path], co[ref.path], sim,
                                        by_label[ref.path])
    return Profile(layers)


# ----------------------------------------------------------------------------- plot

def plot(prof: Profile, path: str | pathlib.Path) -> pathlib.Path | None:
    """A PNG with one row per layer: routing frequency per expert, co-activation (row-normalised) and router
    similarity. Returns its path, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("moejax.surgery: matplotlib is not installed; no plot written")
        return None
    rows = len(prof.layers)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.2 * rows), squeeze=False)
    for row, (name, lp) in zip(axes, prof.layers.items()):
        e = np.arange(lp.num_routed)
        row[0].bar(e, lp.frequency)
        row[0].set(title=f"{name}: frequency", xlabel="expert")
        co = lp.coactivation / np.maximum(np.diag(lp.coactivation)[:, None], 1)
        row[1].imshow(co, cmap="viridis", vmin=0, vmax=1)
        row[1].set(title="co-activation P(j | i)", xlabel="j", ylabel="i")
        if lp.router_similarity is not None:
            row[2].imshow(lp.router_similarity, cmap="coolwarm", vmin=-1, vmax=1)
        row[2].set(title="router cosine similarity", xlabel="expert", ylabel="expert")
    fig.tight_layout()
    out = pathlib.Path(path)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
