"""Train state, losses and the jitted train/eval steps (task: ``classification`` or ``lm``).

Training objective of one step (all terms averaged over the batch's targets):

    L = CE + sum over layers and names of RoutingStats.losses[name]

each loss already weighted by the plug-in that owns it (:mod:`moejax.routing.loss`: ``router.load_balance_weight``,
...); the trainer knows none of them by name and logs each sum as ``loss/<name>``. A training objective plug-in
(:mod:`moejax.training.plugin`) may run several forward passes and combine them (THOR's consistency objective:
``L = L_a + L_b + alpha * consistency_loss(logits_a, logits_b)``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from moejax.parallel.sharding import path_name
from moejax.routing.loss import sum_losses
from moejax.routing.types import RoutingStats
from moejax.training.plugin import OBJECTIVES, Objective, PassOutput


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config (the data position is ``step``).

    step: int32[]; params; opt_state; moe_state: non-gradient layer state (e.g. selection biases);
    rng: uint32 key data of the run's base key (per-step keys are ``fold_in(rng, step)``).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    moe_state: Any
    rng: jax.Array


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient or state, or a state to save or restore is not finite."""


def _is_checked(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def leaf_finite_flags(state: TrainState) -> jax.Array:
    """bool[n]: whether each floating leaf of ``state``'s params, opt_state and moe_state is all finite."""
    leaves = [x for x in jax.tree_util.tree_leaves((state.params, state.opt_state, state.moe_state))
              if _is_checked(x)]
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def checked_leaf_paths(state: TrainState) -> list[str]:
    """The paths (``params/Dense_0/kernel``) of the leaves that :func:`leaf_finite_flags` checks, in its order."""
    out = []
    for name, part in (("params", state.params), ("opt_state", state.opt_state), ("moe_state", state.moe_state)):
        out += [name + "/" + path_name(p) for p, x in jax.tree_util.tree_flatten_with_path(part)[0] if _is_checked(x)]
    return out


def first_nonfinite(state: TrainState, flags: Any) -> str | None:
    """The path of the first leaf whose flag in ``flags`` (from :func:`leaf_finite_flags`) is False, or None."""
    flags = np.asarray(flags)
    bad = np.flatnonzero(~flags)
    if not bad.size:
        return None
    return checked_leaf_paths(state)[int(bad[0])]


def split_batch(batch: dict[str, jax.Array], task: str) -> tuple[jax.Array, jax.Array]:
    """(model inputs, targets): ``inputs``/``labels`` for classification; shifted ``tokens`` [B, L+1] for LM."""
    if task == "lm":
        tokens = batch["tokens"]
        return tokens[:, :-1], tokens[:, 1:]
    return batch["inputs"], batch["labels"]


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-target cross-entropy and correctness. logits [..., V], targets int[...] -> two float32[...]."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return ce, correct


def aux_loss(stats: Sequence[RoutingStats]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum over layers of every layer's (already weighted) losses, and each loss's sum over layers by name."""
    terms = sum_losses(s.losses for s in stats)
    return sum(terms.values(), jnp.zeros((), jnp.float32)), terms


def layer_metrics(stats: Sequence[RoutingStats]) -> dict[str, Any]:
    """Per-layer routing statistics (lists indexed by FFN layer)."""
    return {
        "expert_load": [s.expert_load for s in stats],
        "dropped_fraction": [s.dropped_fraction for s in stats],
        "router_entropy": [s.router_entropy for s in stats],
        "experts_per_token": [s.experts_per_token for s in stats],
    }


def pass_rngs(rng: jax.Array, index: int = 0) -> dict[str, jax.Array]:
    """The ``{'dropout', 'jitter'}`` RNGs of forward pass ``index`` of a train step whose key is ``rng``.

    Pass 0 is the only pass of an ordinary step; THOR's second pass (``index=1``) uses ``fold_in(rng, 1)``,
    so its dropout masks, router jitter and random routing differ from pass 0's.
    """
    key = rng if index == 0 else jax.random.fold_in(rng, index)
    dropout, jitter = jax.random.split(key)
    return {"dropout": dropout, "jitter": jitter}


def _apply(model: nn.Module, params: Any, moe_state: Any, inputs: jax.Array, *, train: bool,
           rngs: dict[str, jax.Array] | None, moe_k: int | None = None):
    variables = {"params": params, **moe_state}
    kwargs = {} if moe_k is None else {"moe_k": moe_k}
    if moe_state:
        (logits, stats), new_state = model.apply(variables, inputs, deterministic=not train, rngs=rngs,
                                                 mutable=list(moe_state.keys()), **kwargs)
        return logits, stats, dict(new_state)
    logits, stats = model.apply(variables, inputs, deterministic=not train, rngs=rngs, **kwargs)
    return logits, stats, moe_state


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, task: str, *, moe_k: int | None = None,
                    objective: Objective | None = None) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]:
    """A pure train step. A non-finite loss, gradient or updated state leaves the state unchanged and reports
    ``finite=0``; metric ``state_finite`` (bool[n]) flags each floating leaf of the updated state (in the order of
    :func:`checked_leaf_paths`) so that the caller can name the first non-finite one without another pass.

    Args:
      moe_k: a static ``k`` for every routed MoE layer (the model's ``moe_k``; None: each ``router.k``), e.g.
        SMoE-Dropout's scheduled k. One step function per value; it is reported as metric ``moe_k``.
      objective: the training objective plug-in (:mod:`moejax.training.plugin`; default ``standard``, one pass).
        With ``objective.passes`` > 1 the model runs once per pass with the RNGs of :func:`pass_rngs` (``0``,
        ``1``, ...), and the objective combines the passes (e.g. THOR's
        :class:`~moejax.training.objectives.consistency.Consistency`). Metrics: ``ce`` and ``accuracy`` are the
        means over the passes (comparable with a single-pass run), plus the objective's own; the layers' losses,
        statistics and the non-gradient state (e.g. selection biases) are those of pass 0.
    """
    if objective is None:
        import moejax.training.objectives  # noqa: F401  (registers the built-in objectives)
        objective = OBJECTIVES.get("standard")()
    passes = objective.passes

    def step_fn(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs, targets = split_batch(batch, task)

        def one_pass(params, index):
            logits, stats, new_moe_state = _apply(model, params, state.moe_state, inputs, train=True,
                                                  rngs=pass_rngs(rng, index), moe_k=moe_k)
            ce, correct = token_losses(logits, targets)
            aux, terms = aux_loss(stats)
            return PassOutput(logits=logits, loss=ce.mean() + aux, ce=ce.mean(), accuracy=correct.mean(),
                              terms=terms, stats=stats, moe_state=new_moe_state)

        def loss_fn(params):
            runs = [one_pass(params, i) for i in range(passes)]
            loss, extra = objective.combine(runs)
            ce = sum(r.ce for r in runs) / passes
            acc = sum(r.accuracy for r in runs) / passes
            return loss, (ce, acc, runs[0].terms, runs[0].stats, runs[0].moe_state, extra)

        (loss, (ce, acc, terms, stats, new_moe_state, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, moe_state=new_moe_state,
                         rng=state.rng)
        # The state guard: one isfinite reduction per floating leaf of the updated state (XLA fuses them with
        # the update and combines the all-reduces), so an update that overflows (an infinite learning rate, a
        # huge step) is refused like a non-finite loss or gradient.
        state_finite = leaf_finite_flags(new)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(state_finite)
        # Never continue on NaNs: a non-finite step keeps the previous state entirely.
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "ce": ce, "accuracy": acc, "grad_norm": grad_norm,
                   "finite": finite.astype(jnp.int32), "state_finite": state_finite,
                   **{f"loss/{k}": v for k, v in terms.items()},
                   **extra, **layer_metrics(stats)}
        if moe_k is not None:
            metrics["moe_k"] = jnp.asarray(moe_k, jnp.int32)
        return new, metrics

    return step_fn


def make_eval_step(model: nn.Module, task: str, *, moe_k: int | None = None
                   ) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, Any]]:
    """Sums over one padded eval batch (``mask`` float32[B] marks real examples), at the model's ``moe_k``
    (static; None: each layer's ``router.k``)."""

    def eval_fn(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, Any]:
        inputs, targets = split_batch(batch, task)
        logits, stats, _ = _apply(model, state.params, state.moe_state, inputs, train=False, rngs=None,
                                  moe_k=moe_k)
        ce, correct = token_losses(logits, targets)
        mask = batch["mask"].astype(jnp.float32)
        mask = mask.reshape(mask.shape + (1,) * (ce.ndim - mask.ndim))
        count = jnp.sum(jnp.broadcast_to(mask, ce.shape))
        return {"loss_sum": jnp.sum(ce * mask), "correct_sum": jnp.sum(correct * mask), "count": count,
                "expert_load": [s.expert_load for s in stats],
                "dropped_fraction": [s.dropped_fraction for s in stats]}

    return eval_fn
