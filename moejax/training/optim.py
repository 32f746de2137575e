"""Optimiser and learning-rate schedule from the ``optimizer`` section of a config."""
from __future__ import annotations

from typing import Any, Mapping

import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    return cfg[key] if key in cfg else default


def validate(cfg: Mapping[str, Any], total_steps: int) -> None:
    """Raises ``ValueError`` naming the bad ``optimizer.*`` field."""
    name = _get(cfg, "name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: must be one of {list(OPTIMIZERS)}")
    schedule = _get(cfg, "schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}: must be one of {list(SCHEDULES)}")
    lr = _get(cfg, "learning_rate", 1e-3)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optimizer.learning_rate={lr!r}: must be a number > 0")
    warmup = _get(cfg, "warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0 or (schedule == "warmup_cosine" and warmup >= total_steps):
        raise ValueError(f"optimizer.warmup_steps={warmup!r}: must be an integer in [0, train.steps={total_steps})")
    clip = _get(cfg, "grad_clip_norm", None)
    if clip is not None and not clip > 0:
        raise ValueError(f"optimizer.grad_clip_norm={clip!r}: must be > 0 or None")
    wd = _get(cfg, "weight_decay", 0.0)
    if not wd >= 0:
        raise ValueError(f"optimizer.weight_decay={wd!r}: must be >= 0")
    known = {"name", "schedule", "learning_rate", "warmup_steps", "grad_clip_norm", "weight_decay", "b1", "b2",
             "momentum", "end_learning_rate_factor"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ValueError(f"optimizer.{unknown[0]}: unknown field; known fields: {sorted(known)}")


def schedule_fn(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    lr = float(_get(cfg, "learning_rate", 1e-3))
    end = lr * float(_get(cfg, "end_learning_rate_factor", 0.0))
    kind = _get(cfg, "schedule", "constant")
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps, alpha=end / lr)
    if kind == "linear":
        return optax.linear_schedule(lr, end, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, int(_get(cfg, "warmup_steps", 0)), total_steps, end)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """``optax`` chain: optional global-norm clipping, then the optimiser with the schedule."""
    validate(cfg, total_steps)
    lr = schedule_fn(cfg, total_steps)
    name = _get(cfg, "name", "adamw")
    b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
    if name == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2)
    elif name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, weight_decay=float(_get(cfg, "weight_decay", 0.0)))
    elif name == "lion":
        opt = optax.lion(lr, b1=b1, b2=min(b2, 0.99), weight_decay=float(_get(cfg, "weight_decay", 0.0)))
    else:
        opt = optax.sgd(lr, momentum=_get(cfg, "momentum", None))
    clip = _get(cfg, "grad_clip_norm", None)
    return optax.chain(optax.clip_by_global_norm(float(clip)), opt) if clip else opt
