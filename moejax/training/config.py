"""Validation of the trainer's part of an experiment config (``train`` and the top level).

The ``train`` section holds the trainer's own fields (:data:`TRAIN_DEFAULTS`) and, flat, the fields of the registered
training objectives and k schedules (:mod:`moejax.training.plugin`: THOR's ``consistency_weight``, SMoE-Dropout's
``moe_k_start``/``moe_k_end``); :func:`train_settings` validates them once and resolves the chosen plug-ins."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

from moejax.errors import unknown_field

TOP_LEVEL = ("seed", "model", "data", "optimizer", "train", "mesh")
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "log_every": 50,
    "eval_every": 500,
    "eval_steps": None,            # eval batches per evaluation (None: the whole split)
    "checkpoint_every": 500,
    "keep_checkpoints": 3,
    "async_checkpoints": True,
    "tensorboard": True,
    "eval_moe_k": None,            # k of every routed layer in evaluation (None: each layer's router.k)
    "profile_steps": None,         # (start, stop): a jax.profiler trace of those steps in workdir/profile
    "peak_tflops": None,           # per-device peak TFLOP/s for MFU where the built-in table has none (e.g. CPU)
}
# The auxiliary-loss weights moved onto the loss plug-ins of each router (``model...router.load_balance_weight``,
# moejax.routing.loss). A config (or an old workdir's config.json) that still sets them in ``train`` gets them applied
# to every router of its model (:func:`legacy_router_fields`), as the trainer used them before.
LEGACY_LOSS_WEIGHTS = ("load_balance_weight", "z_loss_weight", "importance_weight", "router_entropy_weight")
# Fields whose default None is an "unset" integer (ml_collections placeholders, overridable on the command line).
_OPTIONAL_INTS = ("eval_steps", "eval_moe_k")


def train_config(**overrides: Any):
    """The ``train`` section with every field present, so that each can be overridden on the command line."""
    from ml_collections import config_dict
    from moejax.training.plugin import plugin_fields
    cfg = config_dict.ConfigDict({k: v for k, v in TRAIN_DEFAULTS.items() if v is not None})
    for name in _OPTIONAL_INTS:
        cfg[name] = config_dict.placeholder(int)
    for name, f in plugin_fields().items():       # the objectives' and schedules' own fields
        if f.default is None:
            cfg[name] = config_dict.placeholder(float if "float" in str(f.type) else int)
        else:
            cfg[name] = f.default
    cfg.profile_steps = config_dict.placeholder(tuple)      # --config.train.profile_steps=10,15
    cfg.peak_tflops = config_dict.placeholder(float)
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


def mesh_config(**overrides: Any):
    """The ``mesh`` section with every field present (see :class:`moejax.parallel.MeshConfig`)."""
    from ml_collections import config_dict
    cfg = config_dict.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1, "distributed": "auto",
                                  "rules": ()})
    for name, kind in (("coordinator_address", str), ("num_processes", int), ("process_id", int),
                       ("num_devices", int)):
        cfg[name] = config_dict.placeholder(kind)
    cfg.update(overrides)
    return cfg


def digits_mlp_config(layers: list, *, steps: int = 200):
    """A complete small experiment config: an MLP classifier with ``layers`` (FFN specs) on the offline ``digits``.

    The shared skeleton of the one-mechanism example configs in ``configs/mechanisms/`` (about 15 s on 2 cores).
    """
    import ml_collections
    from ml_collections import config_dict
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict({"name": "digits", "batch_size": 64, "eval_batch_size": 360, "seed": 0})
    config.data.data_dir = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict({"kind": "mlp", "d_model": 64, "layers": list(layers), "residual": True,
                                              "norm": "layernorm"})
    config.optimizer = optimizer_config(name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=20,
                                        weight_decay=1e-4, grad_clip_norm=1.0)
    config.train = train_config(steps=steps, log_every=50, eval_every=steps // 2, checkpoint_every=steps // 2,
                                keep_checkpoints=1)
    config.mesh = mesh_config()
    return config


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Mapping[str, Any]):
    """The validated ``train`` section (:func:`train_settings`): the trainer's own fields (:data:`TRAIN_DEFAULTS`),
    the chosen training objective and k schedule (:mod:`moejax.training.plugin`), and the flat fields the config gave
    for plug-ins and legacy loss weights (``extra``: ``moe_k_start``, ``load_balance_weight``, ...; None when unset).

    Read it by attribute (``settings.steps``, ``settings.objective``) or, as older code does, by key
    (``settings["steps"]``, ``settings["moe_k_start"]``)."""

    steps: int
    log_every: int
    eval_every: int
    eval_steps: int | None
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool
    tensorboard: bool
    eval_moe_k: int | None
    profile_steps: tuple[int, int] | None
    peak_tflops: float | None
    objective: Any
    k_schedule: Any
    extra: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        if name in self.extra:
            return self.extra[name]
        if name == "extra" or name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self) if f.name != "extra")

    def __iter__(self) -> Iterator[str]:
        return iter((*self._names(), *self.extra))

    def __len__(self) -> int:
        return len(self._names()) + len(self.extra)


def train_settings(config: Mapping[str, Any]) -> TrainConfig:
    """The ``train`` section merged over the defaults, validated once into a :class:`TrainConfig`; errors name the
    field (``train.steps``)."""
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown top-level config field; known: {list(TOP_LEVEL)}")
    for section in ("model", "data"):
        if section not in config:
            raise ValueError(f"{section}: missing config section")
    _int_at_least("seed", config.get("seed", 0), 0)
    train = dict(config.get("train", {}).items()) if "train" in config else {}
    from moejax.training.plugin import choose, plugin_fields
    plugin = plugin_fields()
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS) - set(LEGACY_LOSS_WEIGHTS) - set(plugin))
    if unknown:
        raise unknown_field(f"train.{unknown[0]}", {*TRAIN_DEFAULTS, *plugin})
    s = {**TRAIN_DEFAULTS, **{name: None for name in LEGACY_LOSS_WEIGHTS}, **train}
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _int_at_least(f"train.{name}", s[name], 1)
    for name in _OPTIONAL_INTS:
        if s[name] is not None:
            _int_at_least(f"train.{name}", s[name], 1)
    s["objective"], s["k_schedule"] = choose(train)
    for name in LEGACY_LOSS_WEIGHTS:
        v = s[name]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"train.{name}={v!r}: must be a finite number >= 0")
    for name in ("async_checkpoints", "tensorboard"):
        if not isinstance(s[name], bool):
            raise ValueError(f"train.{name}={s[name]!r}: must be True or False")
    from moejax.training.profiling import check_profile_steps
    s["profile_steps"] = check_profile_steps(s["profile_steps"], s["steps"])
    peak = s["peak_tflops"]
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 < peak < 1e6):
        raise ValueError(f"train.peak_tflops={peak!r}: must be None or a positive number of TFLOP/s per device")
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in s.items() if k in own},
                       extra={k: v for k, v in s.items() if k not in own})


def legacy_router_fields(settings: Mapping[str, Any]) -> dict[str, float]:
    """The loss weights a config still sets in ``train`` (``train.load_balance_weight``, ...), to be set on every
    router of its model (:func:`moejax.models.build.with_router_fields`); empty for a config that sets them on the
    routers."""
    return {name: settings[name] for name in LEGACY_LOSS_WEIGHTS if settings.get(name) is not None}


def scheduled_moe_k(settings: TrainConfig, step: int) -> int | None:
    """The ``k`` of every routed MoE layer for train step ``step`` (0-based): None without a k schedule, else the
    chosen schedule's (:mod:`moejax.training.plugin`; e.g. SMoE-Dropout's ``moe_k_start`` -> ``moe_k_end``).

    Each routed layer clips it to its number of router outputs (``moejax.layers.MoELayer``, ``LayerContext.k``).
    """
    schedule = settings.k_schedule
    return None if schedule is None else schedule.k(step, settings.steps)
