"""Optimiser and learning-rate schedule from the ``optimizer`` section of a config."""
from __future__ import annotations

from typing import Any, Mapping

import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


# The one list of optimizer fields and their defaults (``optimizer_config`` builds the section from it).
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "adamw", "schedule": "constant", "learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0,
    "b1": 0.9, "b2": 0.999, "momentum": 0.0, "end_learning_rate_factor": 0.0, "grad_clip_norm": None,
}


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else OPTIMIZER_DEFAULTS[key]


def validate(cfg: Mapping[str, Any], total_steps: int) -> None:
    """Raises ``ValueError`` naming the bad ``optimizer.*`` field."""
    name = _get(cfg, "name")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: must be one of {list(OPTIMIZERS)}")
    schedule = _get(cfg, "schedule")
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}: must be one of {list(SCHEDULES)}")
    lr = _get(cfg, "learning_rate")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optimizer.learning_rate={lr!r}: must be a number > 0")
    warmup = _get(cfg, "warmup_steps")
    if not isinstance(warmup, int) or warmup < 0 or (schedule == "warmup_cosine" and warmup >= total_steps):
        raise ValueError(f"optimizer.warmup_steps={warmup!r}: must be an integer in [0, train.steps={total_steps})")
    clip = _get(cfg, "grad_clip_norm")
    if clip is not None and not clip > 0:
        raise ValueError(f"optimizer.grad_clip_norm={clip!r}: must be > 0 or None")
    wd = _get(cfg, "weight_decay")
    if not wd >= 0:
        raise ValueError(f"optimizer.weight_decay={wd!r}: must be >= 0")
    unknown = sorted(set(cfg.keys()) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise ValueError(f"optimizer.{unknown[0]}: unknown field; known fields: {sorted(OPTIMIZER_DEFAULTS)}")


def schedule_fn(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    lr = float(_get(cfg, "learning_rate"))
    end = lr * float(_get(cfg, "end_learning_rate_factor"))
    kind = _get(cfg, "schedule")
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps, alpha=end / lr)
    if kind == "linear":
        return optax.linear_schedule(lr, end, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, int(_get(cfg, "warmup_steps")), total_steps, end)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """``optax`` chain: optional global-norm clipping, then the optimiser with the schedule."""
    validate(cfg, total_steps)
    lr = schedule_fn(cfg, total_steps)
    name = _get(cfg, "name")
    b1, b2 = float(_get(cfg, "b1")), float(_get(cfg, "b2"))
    if name == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2)
    elif name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, weight_decay=float(_get(cfg, "weight_decay")))
    elif name == "lion":
        opt = optax.lion(lr, b1=b1, b2=min(b2, 0.99), weight_decay=float(_get(cfg, "weight_decay")))
    else:
        opt = optax.sgd(lr, momentum=_get(cfg, "momentum") or None)
    clip = _get(cfg, "grad_clip_norm")
    return optax.chain(optax.clip_by_global_norm(float(clip)), opt) if clip else opt
