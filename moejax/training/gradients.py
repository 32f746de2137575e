"""Per-minibatch gradients of the trainer's own objective, and gradient-noise statistics over minibatches.

The gradients come from :func:`moejax.training.steps.make_train_step` itself, not from a re-implementation
of its loss: the step is built with :func:`capture_gradients` as its optimiser, a gradient transformation
whose updates are zero and whose new state *is* the gradient it was given. One such step at fixed
parameters therefore returns, in ``new_state.opt_state``, exactly ``jax.grad`` of the training objective
(cross-entropy plus the layers' weighted auxiliary losses, THOR's second pass when
configured) on that batch, before any clipping (clipping lives in the optimiser chain), with the step's own
RNG (``fold_in(rng, step)``) and the step's routing statistics as its metrics.

Gradient noise (:func:`gradient_noise`) of ``N`` minibatch gradients ``g_1..g_N`` of one parameter group at
the same parameters, with ``gbar`` their mean:

- ``trace``: ``sum_p Var_i(g_i[p])`` = ``1/(N-1) sum_i ||g_i - gbar||^2``, the per-parameter variance
  (unbiased, ddof=1) summed over the group's parameters;
- ``mean_sq_norm``: ``||gbar||^2``;
- ``noise``: ``mean_i ||g_i - gbar||^2 / ||gbar||^2`` (ddof=0 in the numerator), the normalised gradient
  noise: 0 when every minibatch agrees, large when the mean gradient is small compared with its spread.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.parallel.sharding import path_name
from moejax.training.steps import TrainState, make_train_step


def capture_gradients() -> optax.GradientTransformation:
    """An "optimiser" whose state is the last gradient it saw and whose updates are zero (parameters stay)."""

    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(grads, state, params=None):  # noqa: ARG001 - the optax signature
        return jax.tree_util.tree_map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


def gradient_fn(model: Any, task: str, *, moe_k: int | None = None,
                objective: Any = None) -> Callable[[TrainState, Mapping[str, Any]], tuple[Any, dict]]:
    """A jitted ``(state, batch) -> (gradient pytree, step metrics)`` of the trainer's train step.

    ``state`` is any :class:`TrainState` (its ``opt_state`` is ignored and replaced); the gradient is with
    respect to ``state.params`` and has its structure. Metrics are the train step's (``loss``, ``ce``,
    ``grad_norm``, per-layer ``experts_per_token``, ...).
    """
    tx = capture_gradients()
    step = make_train_step(model, tx, task, moe_k=moe_k, objective=objective)

    @jax.jit
    def fn(state: TrainState, batch):
        state = state.replace(opt_state=tx.init(state.params))
        new, metrics = step(state, batch)
        return new.opt_state, metrics

    return fn


def minibatch_gradients(model: Any, task: str, state: TrainState,
                        batches: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[list[Any], list[dict]]:
    """Gradients (and train-step metrics) of the training objective on each batch, all at ``state``'s parameters.

    ``kwargs`` (``moe_k``, ``objective``) are passed to :func:`gradient_fn`; each call builds (and
    compiles) a new one, so code that measures at many points should keep one :func:`gradient_fn`. Raises
    ``FloatingPointError`` when a gradient is non-finite (the train step then reports ``finite=0``).
    """
    fn = gradient_fn(model, task, **kwargs)
    grads, metrics = [], []
    for i, batch in enumerate(batches):
        g, m = fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
        if not int(m["finite"]):
            raise FloatingPointError(f"batches[{i}]: non-finite loss or gradient at step {int(state.step)}")
        grads.append(g)
        metrics.append(m)
    return grads, metrics


def default_groups(name: str) -> str:
    """The parameter group of a parameter path: ``router`` (router kernels), ``experts`` (expert weights) or
    ``other`` (input projection, norms, head, dense FFNs)."""
    parts = name.split("/")
    if "router" in parts:
        return "router"
    if "experts" in parts or "shared" in parts:
        return "experts"
    return "other"


def flatten_groups(grads: Any, group_of: Callable[[str], str] = default_groups) -> dict[str, np.ndarray]:
    """``{group: float64[P_group]}``, the gradient's leaves of each group concatenated in path order."""
    out: dict[str, list[np.ndarray]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        out.setdefault(group_of(path_name(path)), []).append(np.asarray(leaf, np.float64).ravel())
    return {g: np.concatenate(v) for g, v in out.items()}


def gradient_noise(grads: Sequence[Any], group_of: Callable[[str], str] = default_groups
                   ) -> dict[str, dict[str, float]]:
    """Noise statistics (module docstring) of ``N >= 2`` gradient pytrees, per group and for ``all`` parameters.

    Returns ``{group: {"trace", "mean_sq_norm", "noise", "num_params"}}``.
    """
    if len(grads) < 2:
        raise ValueError(f"grads: need at least 2 minibatch gradients, got {len(grads)}")
    flat = [flatten_groups(g, group_of) for g in grads]
    groups = list(flat[0]) + ["all"]
    out: dict[str, dict[str, float]] = {}
    for group in groups:
        if group == "all":
            g = np.stack([np.concatenate([f[k] for k in flat[0]]) for f in flat])
        else:
            g = np.stack([f[group] for f in flat])
        mean = g.mean(0)
        dev = ((g - mean) ** 2).sum(1)          # ||g_i - gbar||^2 per minibatch
        sq = float((mean ** 2).sum())
        out[group] = {"trace": float(dev.sum() / (len(g) - 1)), "mean_sq_norm": sq,
                      "noise": float(dev.mean() / sq) if sq > 0 else float("inf"), "num_params": int(g.shape[1])}
    return out
