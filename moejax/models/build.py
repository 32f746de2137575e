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
import numpy as np

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


def sizes_from_params(experiment: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The data-supplied sizes of :func:`model_config` (``vocab_size``, ``num_classes``, ``input_shape``) that the
    trainer fills in from the dataset, read off a trained model's parameters where they show; the data is read only
    for a ViT whose image size the config leaves out. ``experiment``: the run's config (``model``, ``data``)."""
    kind = experiment["model"].get("kind")
    if kind == "transformer_lm":
        return {"vocab_size": int(np.shape(params["embed"]["embedding"])[0])}
    sizes: dict[str, Any] = {"num_classes": int(np.shape(params["head"]["kernel"])[-1])}
    if kind == "vit" and (experiment["model"].get("image_size") is None or "channels" not in experiment["model"]):
        from moejax.data import from_config
        sizes["input_shape"] = from_config(experiment["data"]).meta.input_shape
    return sizes


def map_moe_specs(cfg: ModelConfig, fn: Any) -> ModelConfig:
    """``cfg`` with every :class:`MoEConfig` in it (a field, or an entry of a tuple field such as an MLP's
    ``layers``) replaced by ``fn(spec)``."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, MoEConfig):
            changes[f.name] = fn(value)
        elif isinstance(value, tuple) and any(isinstance(v, MoEConfig) for v in value):
            changes[f.name] = tuple(fn(v) if isinstance(v, MoEConfig) else v for v in value)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def with_router_fields(cfg: ModelConfig, fields: Mapping[str, Any]) -> ModelConfig:
    """``cfg`` with ``fields`` (flat router fields, e.g. ``{'load_balance_weight': 0.0}``) set on every router."""
    if not fields:
        return cfg
    return map_moe_specs(cfg, lambda spec: dataclasses.replace(spec, router=spec.router.replace(**fields)))


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
    """Parameter counts of a model: all of them, and those *applied to one token in one forward pass*.

    A parameter is applied to a token when that token's output depends on it in the pass (its loss would give
    the parameter a gradient). Everything outside the routed experts counts as applied to every token: the
    embedding table (in full, as is usual), attention, norms, dense FFNs, routers (every chain iteration's),
    shared experts and their gate, Soft MoE's slot parameters. What varies is the routed experts' share, per
    MoE layer (``E`` experts of ``P`` parameters each, ``K = router.k``, ``I`` chain iterations):

    ==============================================  ==========================  ===================================
    layer / router                                  ``active_max`` takes        ``active_mean`` takes
    ==============================================  ==========================  ===================================
    sparse, fixed k (topk, hash, random, sinkhorn,  ``K P``                     ``K P`` (exact unless copies are
    base, sparse_ot)                                                            dropped: capacity, gate dropout)
    sparse, dynamic k (top_p, threshold)            ``K P`` (K is the maximum)  None (data-dependent; 1 expert
                                                                                when K = 1)
    sparse, expert choice                           ``E P`` (every expert may   ``C E / T`` experts' P: ``C`` =
                                                    choose the same token)      ``capacity(T, train)``, ``T`` the
                                                                                tokens routed together for ``x``
    MoE++ zero-computation experts (sparse, chain)  the ``K`` dearest outputs:  None (how many slots the zero,
                                                    FFN ``P``, constant ``3D``  copy and constant experts take is
                                                    (``v``, ``W_c``), zero and  data-dependent)
                                                    copy 0
    chain (shared experts over ``I`` iterations)    ``min(I K, E) P``: distinct None unless ``K = E`` (iterations
                                                    experts along the chain     may pick the same experts)
                                                    (expert choice: ``E P``)
    Soft MoE                                        ``E P``: every slot mixes   ``E P``
                                                    all tokens, every token
                                                    combines all slots
    SMEAR                                           ``E P``: the merged expert  ``E P``
                                                    ``sum_e p_e theta_e`` reads
                                                    all (``p_e > 0``)
    ==============================================  ==========================  ===================================

    These count parameters, not FLOPs: SMEAR runs one (merged) expert per example or token, a chain runs
    ``I K`` expert evaluations per token even when they repeat an expert, Soft MoE runs ``E S`` slots per
    group of ``M`` tokens.

    Attributes:
      total: all parameters (the ``params`` collection; a frozen router's kernel in ``moe_state`` is not one).
      routed_experts: parameters of the routed FFN experts, ``E P`` per MoE layer (a chain's shared set once;
        MoE++ zero-computation experts are not FFN experts).
      active_max: an upper bound, tight for the layer kinds above: the most parameters that any one token can
        have applied to it. Exact for every token with fixed-k token choice when nothing is dropped.
      active_mean: the mean over the ``T`` tokens of a batch shaped like ``x`` (see :func:`param_counts`),
        assuming no dropped copies; None when some layer's count depends on the data (dynamic k,
        zero-computation experts, chains that may repeat experts): measure ``RoutingStats.experts_per_token``.
    """

    total: int
    active_max: int
    active_mean: float | None
    routed_experts: int

    @property
    def active(self) -> int:
        """``active_max``, under the name that the experiment scripts record (``params.active``)."""
        return self.active_max


def expert_params(spec: MoEConfig, d_model: int) -> int:
    """Parameters of one routed expert of ``spec`` at width ``d_model``."""
    return sum(math.prod(s) for s, _ in ffn_param_shapes(spec.expert_kind, d_model, spec.hidden_dim,
                                                          spec.use_bias).values())


def constant_expert_params(d_model: int) -> int:
    """Parameters of one MoE++ constant expert: its vector ``v`` [D] and its gate ``W_c`` [D, 2]."""
    return 3 * d_model


def routed_tokens(cfg: ModelConfig, shape: Sequence[int]) -> int:
    """``T``, the tokens every MoE layer of a model with ``cfg`` routes together for an input of ``shape``:
    ``B * L`` for the LM (int[B, L]), ``B * (N + 1)`` (class token) or ``B * N`` patches for the ViT, ``B`` for
    the MLP classifier (one token per example)."""
    if isinstance(cfg, LMConfig):
        return int(shape[0]) * int(shape[1])
    if isinstance(cfg, ViTConfig):
        return int(shape[0]) * (cfg.num_patches + (cfg.pooling == "cls"))
    return int(shape[0])


def routed_active(spec: MoEConfig, d_model: int, num_tokens: int, train: bool = True) -> tuple[int, float | None]:
    """``(most, mean or None)`` routed-expert parameters (FFN and MoE++ constant experts) applied to one token by
    the layer of ``spec``, routing ``num_tokens`` tokens together; the table of :class:`ParamCounts`."""
    e, p, k = spec.num_experts, expert_params(spec, d_model), spec.router.k
    if spec.layer in ("soft", "smear"):
        return e * p, float(e * p)
    iters = spec.resolved_chain_iterations if spec.layer == "chain" else 1
    if "token_choice" not in spec.router.options.offers:     # expert choice: C tokens per expert
        mean = spec.capacity(num_tokens, train) * e / num_tokens * p if iters == 1 else None
        return e * p, mean
    # The dearest choice of K outputs per iteration: FFN experts are shared by the iterations (at most E distinct),
    # constant experts belong to one iteration each; try every number m of constant-expert picks.
    c, per_iter = constant_expert_params(d_model), min(k, spec.constant_experts)
    most = max(p * min(e, iters * k - m) + c * m for m in range(iters * per_iter + 1))
    fixed = (spec.num_zero_computation == 0 and (not spec.router.options.dynamic_k or k == 1)
             and (iters == 1 or k == e))
    return most, float(most) if fixed else None


def param_counts(model: nn.Module, x: Any, *, train: bool = True, params: Any = None) -> ParamCounts:
    """Counts of ``model`` (built by :func:`build_model`) for inputs like ``x`` (an array or
    ``jax.ShapeDtypeStruct``); nothing is computed (``jax.eval_shape``).

    ``x``'s batch size matters only to expert-choice layers, whose mean number of experts per token is
    ``C E / T``: pass the shape of a training batch; ``train`` picks the capacity factor (training or eval).
    ``params``: the model's parameters (or their shapes) when the caller has them; otherwise they are traced.
    """
    if params is None:
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
    total = count_params(params)
    cfg = model.config
    tokens = routed_tokens(cfg, x.shape)
    routed, idle_max, idle_mean = 0, 0, 0.0
    for spec in cfg.ffn_specs():
        if isinstance(spec, MoEConfig):
            experts = spec.num_experts * expert_params(spec, cfg.d_model)
            iters = spec.resolved_chain_iterations if spec.layer == "chain" else 1
            layer_routed = experts + iters * spec.constant_experts * constant_expert_params(cfg.d_model)
            routed += experts
            most, mean = routed_active(spec, cfg.d_model, tokens, train)
            idle_max += layer_routed - most
            idle_mean = None if mean is None or idle_mean is None else idle_mean + layer_routed - mean
    return ParamCounts(total=total, active_max=total - idle_max,
                       active_mean=None if idle_mean is None else total - idle_mean, routed_experts=routed)
