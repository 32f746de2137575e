"""``build_model`` from an experiment's model config, and parameter counts (total and active per token).

Data-supplied sizes (``num_classes``, ``vocab_size``, ``input_shape``) fill fields the model config leaves
out; a field the model config sets must agree with them (``num_classes``, ``image_size``, ``channels``:
equal; ``vocab_size``: at least the data's, so that a vocabulary padded to a round size is allowed).
Sizes that a model kind does not use are ignored.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from moejax.config import MoEConfig
from moejax.experts.ffn import ffn_param_shapes
from moejax.models.config import CONFIGS, PREFIX, LMConfig, MLPConfig, ModelConfig, ViTConfig
from moejax.models.mlp import MLPClassifier
from moejax.models.transformer import TransformerLM
from moejax.models.vit import ViTClassifier

MODELS: dict[type, type[nn.Module]] = {MLPConfig: MLPClassifier, LMConfig: TransformerLM, ViTConfig: ViTClassifier}


def _fill(d: dict[str, Any], field: str, data_value: Any, source: str, at_least: bool = False) -> None:
    if data_value is None:
        return
    if field not in d or d[field] is None:
        d[field] = data_value
        return
    ok = d[field] >= data_value if at_least else d[field] == data_value
    if not ok:
        rel = ">=" if at_least else "equal to"
        raise ValueError(f"{PREFIX}{field}={d[field]!r}: must be {rel} the dataset's {source}={data_value!r}")


def model_config(model_cfg: Mapping[str, Any] | ModelConfig, *, num_classes: int | None = None,
                 vocab_size: int | None = None, input_shape: Sequence[int] | None = None) -> ModelConfig:
    """The typed config of ``model_cfg`` (a mapping with ``kind`` in ``mlp``, ``transformer_lm``, ``vit``, or a
    typed config) completed with the data's sizes; ``input_shape`` is one example's shape without the batch
    axis (``(H, W, C)`` for ``vit``)."""
    if isinstance(model_cfg, tuple(MODELS)):
        d, cls = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}, type(model_cfg)
    else:
        d = dict(model_cfg.items())
        kind = d.pop("kind", None)
        if kind not in CONFIGS:
            raise ValueError(f"{PREFIX}kind={kind!r}: must be one of {sorted(CONFIGS)}")
        cls = CONFIGS[kind]
    if cls in (MLPConfig, ViTConfig):
        _fill(d, "num_classes", num_classes, "num_classes")
    if cls is LMConfig:
        _fill(d, "vocab_size", vocab_size, "vocab_size", at_least=True)
    if cls is ViTConfig and input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise ValueError(f"input_shape={shape}: a vit model needs images of shape (H, W, C)")
        if isinstance(d.get("image_size"), int):
            d["image_size"] = (d["image_size"],) * 2
        elif d.get("image_size") is not None:
            d["image_size"] = tuple(d["image_size"])
        _fill(d, "image_size", shape[:2], "input_shape[:2]")
        _fill(d, "channels", shape[2], "input_shape[2]")
    return cls.from_dict(d) if not isinstance(model_cfg, cls) else cls(**d)


def build_model(model_cfg: Mapping[str, Any] | ModelConfig, *, num_classes: int | None = None,
                vocab_size: int | None = None, input_shape: Sequence[int] | None = None) -> nn.Module:
    """The model of ``model_cfg`` (see :func:`model_config`): MLPClassifier, TransformerLM or ViTClassifier."""
    cfg = model_config(model_cfg, num_classes=num_classes, vocab_size=vocab_size, input_shape=input_shape)
    return MODELS[type(cfg)](cfg)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (boxed ``nn.Partitioned`` or not, arrays or shape structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """total: all parameters; routed_experts: those of the routed experts; active: used per token
    (``total`` minus ``(E - K) / E`` of each MoE layer's routed experts; expert choice: ``K`` on average).
    Embeddings count in both."""

    total: int
    active: int
    routed_experts: int


def expert_params(spec: MoEConfig, d_model: int) -> int:
    """Parameters of one routed expert of ``spec`` at width ``d_model``."""
    return sum(math.prod(s) for s, _ in ffn_param_shapes(spec.expert_kind, d_model, spec.hidden_dim,
                                                          spec.use_bias).values())


def param_counts(model: nn.Module, x: Any) -> ParamCounts:
    """Counts of ``model`` (built by :func:`build_model`) for inputs like ``x`` (an array or
    ``jax.ShapeDtypeStruct``); nothing is computed (``jax.eval_shape``)."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    total = count_params(shapes["params"])
    cfg = model.config
    routed, idle = 0, 0
    for spec in cfg.ffn_specs():
        if isinstance(spec, MoEConfig):
            per = expert_params(spec, cfg.d_model)
            routed += spec.num_experts * per
            idle += (spec.num_experts - min(spec.router.k, spec.num_experts)) * per
    return ParamCounts(total=total, active=total - idle, routed_experts=routed)
