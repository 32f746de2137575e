"""Train state, losses and the jitted train/eval steps (task: ``classification`` or ``lm``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from moejax.routing.types import RoutingStats


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


@dataclasses.dataclass(frozen=True)
class AuxWeights:
    """Weights of the per-layer auxiliary losses in the training objective (summed over MoE layers)."""

    load_balance: float = 0.01
    z_loss: float = 0.001
    importance: float = 0.0


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


def aux_loss(stats: Sequence[RoutingStats], w: AuxWeights) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over layers of the auxiliary losses, and each term's unweighted sum for logging."""
    terms = {
        "load_balance": sum((s.aux.load_balance for s in stats), jnp.zeros(())),
        "z_loss": sum((s.aux.z_loss for s in stats), jnp.zeros(())),
        "importance": sum((s.aux.importance for s in stats), jnp.zeros(())),
    }
    total = w.load_balance * terms["load_balance"] + w.z_loss * terms["z_loss"] + w.importance * terms["importance"]
    return total, terms


def layer_metrics(stats: Sequence[RoutingStats]) -> dict[str, Any]:
    """Per-layer routing statistics (lists indexed by FFN layer)."""
    return {
        "expert_load": [s.expert_load for s in stats],
        "dropped_fraction": [s.dropped_fraction for s in stats],
        "router_z_loss": [s.aux.z_loss for s in stats],
        "router_entropy": [s.router_entropy for s in stats],
        "experts_per_token": [s.experts_per_token for s in stats],
    }


def _apply(model: nn.Module, params: Any, moe_state: Any, inputs: jax.Array, *, train: bool, rng: jax.Array | None):
    variables = {"params": params, **moe_state}
    rngs = None
    if rng is not None:
        dropout, jitter = jax.random.split(rng)
        rngs = {"dropout": dropout, "jitter": jitter}
    if moe_state:
        (logits, stats), new_state = model.apply(variables, inputs, deterministic=not train, rngs=rngs,
                                                 mutable=list(moe_state.keys()))
        return logits, stats, dict(new_state)
    logits, stats = model.apply(variables, inputs, deterministic=not train, rngs=rngs)
    return logits, stats, moe_state


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, task: str, weights: AuxWeights
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]:
    """A pure train step. A non-finite loss or gradient leaves the state unchanged and reports ``finite=0``."""

    def step_fn(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs, targets = split_batch(batch, task)

        def loss_fn(params):
            logits, stats, new_moe_state = _apply(model, params, state.moe_state, inputs, train=True, rng=rng)
            ce, correct = token_losses(logits, targets)
            aux, terms = aux_loss(stats, weights)
            loss = ce.mean() + aux
            return loss, (ce.mean(), correct.mean(), terms, stats, new_moe_state)

        (loss, (ce, acc, terms, stats, new_moe_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, moe_state=new_moe_state,
                         rng=state.rng)
        # Never continue on NaNs: a non-finite step keeps the previous state entirely.
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "ce": ce, "accuracy": acc, "grad_norm": grad_norm,
                   "finite": finite.astype(jnp.int32), **{f"aux/{k}": v for k, v in terms.items()},
                   **layer_metrics(stats)}
        return new, metrics

    return step_fn


def make_eval_step(model: nn.Module, task: str) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, Any]]:
    """Sums over one padded eval batch (``mask`` float32[B] marks real examples)."""

    def eval_fn(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, Any]:
        inputs, targets = split_batch(batch, task)
        logits, stats, _ = _apply(model, state.params, state.moe_state, inputs, train=False, rng=None)
        ce, correct = token_losses(logits, targets)
        mask = batch["mask"].astype(jnp.float32)
        mask = mask.reshape(mask.shape + (1,) * (ce.ndim - mask.ndim))
        count = jnp.sum(jnp.broadcast_to(mask, ce.shape))
        return {"loss_sum": jnp.sum(ce * mask), "correct_sum": jnp.sum(correct * mask), "count": count,
                "expert_load": [s.expert_load for s in stats],
                "dropped_fraction": [s.dropped_fraction for s in stats]}

    return eval_fn
