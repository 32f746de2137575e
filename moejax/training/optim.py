"""Optimiser and learning-rate schedule from the ``optimizer`` section of a config."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import optax

from moejax.errors import unknown_field

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


# The one list of optimizer fields and their defaults (``optimizer_config`` builds the section from it).
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "adamw", "schedule": "constant", "learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0,
    "b1": 0.9, "b2": 0.999, "momentum": 0.0, "end_learning_rate_factor": 0.0, "grad_clip_norm": None,
}


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else OPTIMIZER_DEFAULTS[key]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(field: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
            high_open: bool = True, what: str | None = None) -> float:
    """``value`` as a float, or a one-line ``ValueError`` naming ``optimizer.<field>``."""
    if high is None:
        high = _FLOAT32_MAX
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(float(value)))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if what is None:
            lo = f"{'(' if low_open else '['}{low:g}"
            hi = "float32 max)" if high == _FLOAT32_MAX else f"{high:g}{')' if high_open else ']'}"
            what = f"must be a finite number in {lo}, {hi}"
        raise ValueError(f"optimizer.{field}={value!r}: {what}")
    return float(value)


def validate(cfg: Mapping[str, Any], total_steps: int) -> None:
    """Raises a one-line ``ValueError`` naming the bad ``optimizer.*`` field (``optimizer.b1=1.5: ...``)."""
    unknown = sorted(set(cfg.keys()) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise unknown_field(f"optimizer.{unknown[0]}", OPTIMIZER_DEFAULTS)
    name = _get(cfg, "name")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: must be one of {list(OPTIMIZERS)}")
    schedule = _get(cfg, "schedule")
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}: must be one of {list(SCHEDULES)}")
    _number("learning_rate", _get(cfg, "learning_rate"), low=0.0, low_open=True,
            what="must be a finite number > 0")
    warmup = _get(cfg, "warmup_steps")
    if (isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0
            or (schedule == "warmup_cosine" and warmup >= total_steps)):
        raise ValueError(f"optimizer.warmup_steps={warmup!r}: must be an integer in [0, train.steps={total_steps})")
    clip = _get(cfg, "grad_clip_norm")
    if clip is not None:
        _number("grad_clip_norm", clip, low=0.0, low_open=True, what="must be a finite number > 0 or None")
    _number("weight_decay", _get(cfg, "weight_decay"), low=0.0, what="must be a finite number >= 0")
    for field in ("b1", "b2"):
        _number(field, _get(cfg, field), low=0.0, high=1.0)
    _number("momentum", _get(cfg, "momentum"), low=0.0, high=1.0)
    _number("end_learning_rate_factor", _get(cfg, "end_learning_rate_factor"), low=0.0, high=1.0, high_open=False)


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
