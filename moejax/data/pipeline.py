"""From a data config to train/eval batchers and the metadata a model needs.

``from_config(cfg)`` takes an ``ml_collections.ConfigDict`` (or a dict, or a :class:`DataConfig`)
and returns a :class:`Pipeline`: ``train.batch(step)``, an ``eval`` iterable of masked batches,
and :class:`DatasetMeta` (task, classes, input shape, vocabulary). Fields are validated at
construction with errors that name them (``data.batch_size``, ``data.name``, ``data.seq_len``),
before anything is downloaded or built.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import numpy as np

from moejax.data.batching import ClassificationBatches, ClassificationEval, check_process_split
from moejax.data.lm import VOCAB_SIZE, LMBatches, LMEval, byte_stream
from moejax.data.reader import SHORT_NAMES, is_shipped, load_split, materialize, not_a_directory, resolve_name
from moejax.errors import unknown_field

Task = Literal["classification", "lm"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset: its task, default eval split and feature keys."""

    task: Task
    eval_split: str
    input_key: str = "image"
    label_key: str = "label"
    text_key: str = "text"
    max_bytes: int | None = None  # LM: default cap on bytes read per split


_IMAGES = DatasetSpec("classification", "test")
# Keys are base names (without "/config" or ":version").
DATASETS: dict[str, DatasetSpec] = {
    "moejax_digits": _IMAGES,
    "moejax_translated_digits": _IMAGES,
    "moejax_mnist1d": DatasetSpec("classification", "test", input_key="x"),
    "moejax_synthetic_clusters": DatasetSpec("classification", "test", input_key="x"),
    "moejax_stdlib_bytes": DatasetSpec("lm", "validation"),
    **{n: _IMAGES for n in ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn_cropped")},
    "tiny_shakespeare": DatasetSpec("lm", "validation"),
    # ~4 GB of text in train: read a 64 MiB prefix unless data.max_bytes says otherwise.
    "lm1b": DatasetSpec("lm", "test", max_bytes=64 << 20),
}


def _base_name(name: str) -> str:
    return resolve_name(name).split("/")[0].split(":")[0]


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"data.{field}={value!r}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of an experiment config.

    Attributes:
      name: a shipped dataset (``digits``, ``mnist1d``, ``stdlib_bytes``, ``synthetic_clusters``,
        ``translated_digits``) or a TFDS name (``mnist``, ``cifar10``, ``tiny_shakespeare``, ...).
      batch_size, eval_batch_size: global batch sizes (``eval_batch_size`` defaults to ``batch_size``).
      seq_len: ``L`` of the LM windows (required for LM datasets, not allowed otherwise).
      seed: the training order / window offsets are a function of ``(seed, step)``.
      data_dir: where datasets live (a directory, created if missing); see :mod:`moejax.data.reader` for the
        default.
      train_split, eval_split: TFDS split strings; ``eval_split`` defaults per dataset.
      in_memory: classification: read the needed features of each split into memory once.
      max_bytes: LM: cap on bytes read per split (default: none, 64 MiB for lm1b).
      task, input_key, label_key, text_key: overrides, required for TFDS datasets not in
        :data:`DATASETS`.
      extra_keys: further features copied into classification batches (``cluster``, ``position_class``).
    """

    name: str = "digits"
    batch_size: int = 128
    eval_batch_size: int | None = None
    seq_len: int | None = None
    seed: int = 0
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    in_memory: bool = True
    max_bytes: int | None = None
    task: Task | None = None
    input_key: str | None = None
    label_key: str | None = None
    text_key: str | None = None
    extra_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("name", self.name, "must be a non-empty string")
        for f in ("batch_size", "eval_batch_size", "seq_len", "max_bytes"):
            v = getattr(self, f)
            if (v is not None or f == "batch_size") and (not _is_int(v) or v < 1):
                _fail(f, v, "must be an integer >= 1" + ("" if f == "batch_size" else " or None"))
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "must be an integer >= 0")
        for f in ("data_dir", "eval_split", "input_key", "label_key", "text_key"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, str) or not v):
                _fail(f, v, "must be a non-empty string or None")
        problem = self.data_dir and not_a_directory(self.data_dir)
        if problem:     # checked here, not when preparing the data: that comes after the workdir and the mesh
            _fail("data_dir", self.data_dir, f"{problem}; give a directory (created if missing), or None for the "
                  "default")
        if not isinstance(self.train_split, str) or not self.train_split:
            _fail("train_split", self.train_split, "must be a non-empty string")
        if not isinstance(self.in_memory, bool):
            _fail("in_memory", self.in_memory, "must be a bool")
        if self.task is not None and self.task not in ("classification", "lm"):
            _fail("task", self.task, "must be 'classification', 'lm' or None (from the dataset table)")
        if not isinstance(self.extra_keys, tuple) or not all(isinstance(k, str) for k in self.extra_keys):
            _fail("extra_keys", self.extra_keys, "must be a tuple of feature names")
        spec = self.spec  # raises for unknown names without a task
        if spec.task == "lm" and self.seq_len is None:
            _fail("seq_len", None, f"required for the language-modelling dataset {self.name!r}")
        if spec.task == "classification" and self.seq_len is not None:
            _fail("seq_len", self.seq_len, f"only for language modelling; {self.name!r} is classification")

    @property
    def spec(self) -> DatasetSpec:
        """The table entry for ``name`` with this config's overrides applied."""
        base = DATASETS.get(_base_name(self.name))
        if base is None:
            if self.task is None:
                shipped = ", ".join(SHORT_NAMES)
                _fail("name", self.name, f"not a shipped dataset ({shipped}) nor in moejax's table "
                      f"{sorted(n for n in DATASETS if not is_shipped(n))}; for another TFDS dataset set "
                      "data.task ('classification' or 'lm') and the feature keys")
            base = DatasetSpec(self.task, "test")
        elif self.task is not None and self.task != base.task:
            _fail("task", self.task, f"{self.name!r} is a {base.task} dataset")
        overrides = {k: getattr(self, k) for k in ("input_key", "label_key", "text_key", "eval_split", "max_bytes")
                     if getattr(self, k) is not None}
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """From a mapping or ``ml_collections.ConfigDict``; unknown keys are rejected by name."""
        d = dict(d.items())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise unknown_field(f"data.{unknown[0]}", names, "DataConfig")
        if isinstance(d.get("extra_keys"), list):
            d["extra_keys"] = tuple(d["extra_keys"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and a trainer need to know about the data.

    Attributes:
      name: the resolved dataset name (``moejax_digits``).
      task: ``classification`` or ``lm``.
      num_classes: classification only.
      input_shape: one example's input: ``(8, 8, 1)`` for digits, ``(seq_len,)`` for LM.
      vocab_size: LM only (256, bytes).
      train_size, eval_size: examples (classification) or tokens (LM) in the two splits.
    """

    name: str
    task: Task
    num_classes: int | None
    input_shape: tuple[int, ...]
    vocab_size: int | None
    train_size: int
    eval_size: int


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """``train.batch(step)`` for training, ``eval`` (iterable, padded, masked) for evaluation."""

    train: ClassificationBatches | LMBatches
    eval: ClassificationEval | LMEval
    meta: DatasetMeta
    config: DataConfig


def _load(cfg: DataConfig, split: str, field: str) -> Any:
    try:
        return load_split(cfg.name, split, cfg.data_dir)
    except ValueError as e:
        if str(e).startswith("split="):
            raise ValueError(f"data.{field}={split!r}: {str(e).split(': ', 1)[1]}") from e
        raise


def _num_classes(source: Any, label_key: str) -> int:
    info = getattr(source, "info", None)
    feature = None
    try:
        feature = info.features[label_key]
    except (AttributeError, KeyError, TypeError):
        pass
    if getattr(feature, "num_classes", None):
        return int(feature.num_classes)
    if hasattr(source, "columns"):  # no metadata, but the labels are in memory
        return int(source.columns[label_key].max()) + 1
    raise ValueError(f"data.label_key={label_key!r}: the dataset has no class count in its metadata; "
                     "set data.in_memory=True to infer it from the labels")


def from_config(cfg: DataConfig | Mapping[str, Any], process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Builds the train batcher, the eval iterable and the metadata for ``cfg``.

    Args:
      cfg: the ``data`` config section.
      process_index, process_count: this process's place (``jax.process_index()``,
        ``jax.process_count()``); batches are this process's slice of the global batch.
    """
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
    spec = cfg.spec
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    check_process_split("data.batch_size", cfg.batch_size, process_index, process_count)
    check_process_split("data.eval_batch_size", eval_bs, process_index, process_count)
    where = dict(process_index=process_index, process_count=process_count)
    train_src = _load(cfg, cfg.train_split, "train_split")
    eval_src = _load(cfg, spec.eval_split, "eval_split")
    name = resolve_name(cfg.name)

    if spec.task == "lm":
        streams = [byte_stream(s, spec.text_key, max_bytes=spec.max_bytes) for s in (train_src, eval_src)]
        windows = len(streams[0]) - cfg.seq_len   # distinct training windows of seq_len + 1 tokens
        if windows >= 1 and cfg.batch_size > windows:
            _fail("batch_size", cfg.batch_size, f"larger than the {windows} distinct windows of data.seq_len + 1 "
                  f"tokens in {name}[{cfg.train_split}] ({len(streams[0])} tokens)")
        train = LMBatches(streams[0], cfg.batch_size, cfg.seq_len, cfg.seed, **where)
        evaluation = LMEval(streams[1], eval_bs, cfg.seq_len, **where)
        meta = DatasetMeta(name, "lm", None, (cfg.seq_len,), VOCAB_SIZE, len(streams[0]), len(streams[1]))
        return Pipeline(train, evaluation, meta, cfg)

    if cfg.batch_size > len(train_src):
        _fail("batch_size", cfg.batch_size, f"larger than the {len(train_src)} examples of {name}[{cfg.train_split}]")
    fields = {**{k: "extra_keys" for k in cfg.extra_keys}, spec.label_key: "label_key", spec.input_key: "input_key"}
    keys = tuple(fields)
    for src, split in ((train_src, cfg.train_split), (eval_src, spec.eval_split)):
        missing = [k for k in keys if k not in src[0]]
        if missing:
            _fail(fields[missing[0]], missing[0], f"not a feature of {name}[{split}]; it has {sorted(src[0])}")
    if cfg.in_memory:
        train_src, eval_src = materialize(train_src, keys), materialize(eval_src, keys)
    common = dict(input_key=spec.input_key, label_key=spec.label_key, extra_keys=cfg.extra_keys, **where)
    train = ClassificationBatches(train_src, cfg.batch_size, cfg.seed, **common)
    evaluation = ClassificationEval(eval_src, eval_bs, **common)
    input_shape = tuple(np.asarray(train_src[0][spec.input_key]).shape)
    meta = DatasetMeta(name, "classification", _num_classes(train_src, spec.label_key), input_shape, None,
                       len(train_src), len(eval_src))
    return Pipeline(train, evaluation, meta, cfg)
