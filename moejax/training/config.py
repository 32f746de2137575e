"""Validation of the trainer's part of an experiment config (``train`` and the top level)."""
from __future__ import annotations

from typing import Any, Mapping

TOP_LEVEL = ("seed", "model", "data", "optimizer", "train", "mesh")
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "log_every": 50,
    "eval_every": 500,
    "eval_steps": None,            # eval batches per evaluation (None: the whole split)
    "checkpoint_every": 500,
    "keep_checkpoints": 3,
    "async_checkpoints": True,
    "load_balance_weight": 0.01,
    "z_loss_weight": 0.001,
    "importance_weight": 0.0,
    "tensorboard": True,
}


def train_config(**overrides: Any):
    """The ``train`` section with every field present, so that each can be overridden on the command line."""
    from ml_collections import config_dict
    cfg = config_dict.ConfigDict({k: v for k, v in TRAIN_DEFAULTS.items() if v is not None})
    cfg.eval_steps = config_dict.placeholder(int)
    cfg.update(overrides)
    return cfg


def optimizer_config(**overrides: Any):
    """The ``optimizer`` section with every field present (see :mod:`moejax.training.optim`)."""
    from ml_collections import config_dict

    from moejax.training.optim import OPTIMIZER_DEFAULTS
    cfg = config_dict.ConfigDict({k: v for k, v in OPTIMIZER_DEFAULTS.items() if v is not None})
    cfg.grad_clip_norm = config_dict.placeholder(float)
    cfg.update(overrides)
    return cfg


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def train_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section merged over the defaults, validated; errors name the field (``train.steps``)."""
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown top-level config field; known: {list(TOP_LEVEL)}")
    for section in ("model", "data"):
        if section not in config:
            raise ValueError(f"{section}: missing config section")
    _int_at_least("seed", config.get("seed", 0), 0)
    train = dict(config.get("train", {}).items()) if "train" in config else {}
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"train.{unknown[0]}: unknown field; known fields: {sorted(TRAIN_DEFAULTS)}")
    s = {**TRAIN_DEFAULTS, **train}
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _int_at_least(f"train.{name}", s[name], 1)
    if s["eval_steps"] is not None:
        _int_at_least("train.eval_steps", s["eval_steps"], 1)
    for name in ("load_balance_weight", "z_loss_weight", "importance_weight"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"train.{name}={v!r}: must be a number >= 0")
    return s
