"""Gating analysis of a deep MoE (trained, or at its initialisation): per-example gate distributions, mutual information, pictures.

Definitions (all on the test split, logs in base 2, so values are bits):

- ``gates[l]``: float32[N, E], layer ``l``'s full gate distribution ``p(e | x) = softmax(router logits)``
  per example, whatever the routing's ``k`` (for ``k = E`` these are exactly the mixture weights).
  It is read from the ``Router`` module's output with flax's ``capture_intermediates``.
- labels ``Y``: ``quadrant`` (the 4 quadrants the digit can sit in), ``position`` (the exact top-left
  pixel: 4 quadrants x 5 x 5 offsets = 100 values) and ``class`` (the digit, 10 values).
- hard MI, ``I(A; Y)``: ``A = argmax_e p(e | x)`` (the top-1 expert); the plug-in estimate from the
  empirical joint histogram of ``(A, Y)``.
- soft MI, ``I(G; Y)``: ``G`` is an expert drawn from the gate, ``P(G = e, Y = y) = mean over examples
  with label y of p(e | x), times P(y)``; ``I = sum_y P(y) KL(P(G | y) || P(G))``. It is zero when the gate
  ignores ``Y`` and reaches ``min(H(Y), log2 E)`` only for confident, ``Y``-determined gates.
- routed MI: the soft MI of the gate restricted to the example's top-``k`` experts and renormalised (the experts
  the layer actually uses and their shares): the soft MI for the dense mixture (``k = E``), the hard MI for top-1.
  At initialisation the router's logits are tiny (``normal(0.02)`` kernel), so the full gate is nearly uniform and
  its soft MI nearly 0, while its top-1 choice is already a function of the input (a linear gate on translated
  pixels is location-dependent by construction): the routed MI measures what the routing does at either point.
- plug-in estimates are biased upwards, more so for labels with many values (``position``), so every MI
  is also reported minus its mean under ``SHUFFLES`` random permutations of the labels (``*_corrected``);
  the README's table shows the corrected soft MI.

With ``E = 4`` experts every MI is at most 2 bits, so the factors are compared on the same scale.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import Router


def gate_distributions(model: Any, variables: dict, images: np.ndarray, batch: int = 720) -> list[np.ndarray]:
    """Per-layer ``p(e | x)``, a list (layer order) of float32[N, E], for images float32[N, ...]."""

    @jax.jit
    def capture(x):
        _, state = model.apply(variables, x, deterministic=True, mutable=["intermediates"],
                               capture_intermediates=lambda mdl, _: isinstance(mdl, Router))
        inter = state["intermediates"]
        out = []
        for name in sorted((n for n in inter if n.startswith("layer_")), key=lambda n: int(n.split("_")[1])):
            captured = inter[name]["router"]["__call__"][0]
            _, logits = captured  # MoELayer calls the router with return_logits=True
            out.append(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        return out

    chunks = [capture(jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return [np.concatenate([np.asarray(c[l]) for c in chunks]) for l in range(len(chunks[0]))]


def accuracy(model: Any, variables: dict, images: np.ndarray, labels: np.ndarray, batch: int = 720) -> float:
    """Share of ``images`` float32[N, ...] whose argmax logit is ``labels`` int[N] (deterministic forward)."""

    @jax.jit
    def predict(x):
        logits, _ = model.apply(variables, x, deterministic=True)
        return jnp.argmax(logits, -1)

    pred = np.concatenate([np.asarray(predict(jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])
    return float(np.mean(pred == np.asarray(labels)))


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def hard_mutual_information(gates: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """``I(argmax gate; label)`` in bits from the empirical joint histogram."""
    a = gates.argmax(-1)
    joint = np.zeros((gates.shape[1], num_labels))
    np.add.at(joint, (a, labels), 1.0)
    joint /= joint.sum()
    return entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.ravel())


def soft_mutual_information(gates: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """``I(G; label)`` in bits with ``P(G = e | x) = gates[x, e]`` (see the module docstring)."""
    joint = np.zeros((num_labels, gates.shape[1]))
    np.add.at(joint, labels, gates)
    joint /= joint.sum()
    return entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.ravel())


SHUFFLES = 20


def routed_distribution(gates: np.ndarray, k: int) -> np.ndarray:
    """float32[N, E]: the gate restricted to each example's top-``k`` experts and renormalised: the share of the
    example's expert computation each expert receives. ``k = E``: the gate itself (dense mixture); ``k = 1``: the
    one-hot top-1 choice (so its soft MI is the hard MI)."""
    e = gates.shape[1]
    if k >= e:
        return gates
    top = np.argsort(-gates, axis=-1, kind="stable")[:, :k]
    kept = np.zeros_like(gates)
    np.put_along_axis(kept, top, np.take_along_axis(gates, top, -1), -1)
    return kept / kept.sum(-1, keepdims=True)


def gating_summary(gates: Sequence[np.ndarray], labels: dict[str, tuple[np.ndarray, int]],
                   seed: int = 0, ks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per layer: hard, soft and routed MI (raw and shuffle-corrected) with each ``labels[name] = (values,
    count)``, top-1 expert usage and mean gate entropy. ``ks[l]`` is layer ``l``'s routing k (None: every layer
    dense); the routed MI is the soft MI of :func:`routed_distribution`, i.e. of the experts the layer actually
    uses for an example and their renormalised weights.

    The shuffle null of each MI is kept too: ``*_null_mean`` (the plug-in bias that ``*_corrected`` subtracts)
    and ``*_null_std`` (its sample std over the ``SHUFFLES`` permutations: how much a corrected value moves by
    chance when the gate ignores the label; the noise floor that a difference is compared with)."""
    rng = np.random.RandomState(seed)
    out = []
    for layer, g in enumerate(gates):
        e = g.shape[1]
        k = e if ks is None else int(ks[layer])
        routed = routed_distribution(g, k)
        row: dict[str, Any] = {"num_experts": e, "k": k}
        for name, (y, n) in labels.items():
            for kind, fn, p in (("hard", hard_mutual_information, g), ("soft", soft_mutual_information, g),
                                ("routed", soft_mutual_information, routed)):
                mi = fn(p, y, n)
                null = np.asarray([fn(p, rng.permutation(y), n) for _ in range(SHUFFLES)])
                row[f"mi_{name}_{kind}"] = mi
                row[f"mi_{name}_{kind}_corrected"] = mi - float(null.mean())
                row[f"mi_{name}_{kind}_null_mean"] = float(null.mean())
                row[f"mi_{name}_{kind}_null_std"] = float(null.std(ddof=1))
        row["top1_usage"] = (np.bincount(g.argmax(-1), minlength=e) / len(g)).tolist()
        row["mean_gate_entropy"] = float(np.mean(-(g * np.log2(np.clip(g, 1e-12, 1))).sum(-1)))
        out.append(row)
    return out


def position_ids(position: np.ndarray) -> tuple[np.ndarray, int]:
    """int[N] ids of the distinct (row, col) positions in int[N, 2], and their count."""
    _, ids = np.unique(position[:, 0] * 1000 + position[:, 1], return_inverse=True)
    return ids.reshape(-1), int(ids.max()) + 1


def position_maps(gates: np.ndarray, position: np.ndarray, canvas: int = 24, digit: int = 8) -> np.ndarray:
    """float32[E, P, P] mean gate of each expert by the digit's top-left (row, col); NaN where no example."""
    side = canvas - digit + 1
    total = np.zeros((gates.shape[1], side, side))
    count = np.zeros((side, side))
    np.add.at(count, (position[:, 0], position[:, 1]), 1.0)
    for e in range(gates.shape[1]):
        np.add.at(total[e], (position[:, 0], position[:, 1]), gates[:, e])
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def class_table(gates: np.ndarray, label: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """float32[num_classes, E]: mean gate of each expert over the examples of each class."""
    return np.stack([gates[label == c].mean(0) for c in range(num_classes)])


def plot_gating(gates: Sequence[np.ndarray], position: np.ndarray, label: np.ndarray, path: str, title: str) -> None:
    """One row per layer: the per-expert position maps, then the class x expert table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = max(g.shape[1] for g in gates)
    fig, axes = plt.subplots(len(gates), e + 1, figsize=(2.2 * (e + 1), 2.4 * len(gates)), squeeze=False)
    for l, g in enumerate(gates):
        maps = position_maps(g, position)
        for j in range(e):
            ax = axes[l, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < g.shape[1]:
                ax.imshow(maps[j], vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"layer {l + 1} expert {j}", fontsize=8)
        ax = axes[l, e]
        ax.imshow(class_table(g, label), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xlabel("expert", fontsize=8), ax.set_ylabel("class", fontsize=8)
        ax.set_yticks(range(10)), ax.set_xticks(range(g.shape[1]))
        ax.tick_params(labelsize=6)
        ax.set_title(f"layer {l + 1}: mean gate per class", fontsize=8)
    fig.suptitle(title + "  (maps: mean gate by the digit's top-left position)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
