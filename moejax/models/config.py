"""Typed, validated configuration of the models: MLP classifier, Transformer LM, ViT classifier.

Every config is a frozen, keyword-only dataclass validated in ``__post_init__``. Errors are ``ValueError``s
whose message starts with the dotted path of the field in an experiment config, ``model.<field>``
(e.g. ``model.num_heads=3: must divide model.d_model=64``), so that the message names the flag that fixes
it (``--config.model.num_heads=4``). Errors of a nested ``MoEConfig`` built by ``from_dict`` are re-raised
with the same prefix: ``model.moe.router.k=9: ...``, ``model.layers[2].num_experts=0: ...``.

An FFN *spec* is either an :class:`~moejax.config.MoEConfig` (an MoE layer) or an ``int`` (the hidden width
of a dense FFN). ``ffn_specs()`` lists the spec of every FFN layer of a model, in layer order; the model
returns one :class:`~moejax.routing.RoutingStats` per entry.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, Mapping, Union

from moejax.config import ACTIVATIONS, MoEConfig
from moejax.errors import unknown_field
from moejax.models.attention import MHA, AttentionConfig, attention_from_any
from moejax.models.attention.rope import Rope, RopeScaling

FFNSpec = Union[MoEConfig, int]
Norm = Literal["layernorm", "rmsnorm"]
PREFIX = "model."
DTYPES = ("float32", "bfloat16", "float16")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"{PREFIX}{field}={value!r}: {why}")


def _positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "must be an integer >= 1")


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, f"must be one of {list(choices)}")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "must be a bool")


def _rate(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(field, value, "must be a number in [0, 1)")


def _ffn_common(cfg: Any) -> None:
    """Checks the fields shared by every model: dense FFN kind, activation, dropout, dtypes."""
    _positive_int("d_model", cfg.d_model)
    _choice("ffn_kind", cfg.ffn_kind, ("mlp", "glu"))
    _choice("activation", cfg.activation, ACTIVATIONS)
    _bool("use_bias", cfg.use_bias)
    _rate("dropout_rate", cfg.dropout_rate)
    _choice("dtype", cfg.dtype, DTYPES)
    _choice("param_dtype", cfg.param_dtype, DTYPES)


def moe_from_any(field: str, value: Any) -> MoEConfig:
    """An ``MoEConfig`` from a config or a mapping; errors are re-raised prefixed with ``model.<field>.``."""
    if isinstance(value, MoEConfig):
        return value
    if not hasattr(value, "items"):
        _fail(field, value, "must be an MoEConfig or a mapping of its fields")
    try:
        return MoEConfig.from_dict(value)
    except ValueError as e:
        raise ValueError(f"{PREFIX}{field}.{e}") from e


def _check_gating_residuals(specs: tuple[FFNSpec, ...]) -> None:
    """MoE++ gating residuals add the router logits of the most recent sparse/chain MoE layer (the models thread
    them through ``moejax.LayerContext.router_logits``) to a layer's own: both must have the same number of router
    outputs. Hash and random routers produce no logits, so the layer after one receives none."""
    prev: tuple[int, int] | None = None
    for i, spec in enumerate(specs):
        if not isinstance(spec, MoEConfig) or spec.layer not in ("sparse", "chain"):
            continue
        if spec.router.gating_residual and prev is not None and prev[1] != spec.num_routed:
            _fail(f"layers[{i}].router.gating_residual", True,
                  f"adds the router logits of {PREFIX}layers[{prev[0]}] ({prev[1]} router outputs) to this "
                  f"layer's, which has num_routed={spec.num_routed}")
        prev = (i, spec.num_routed) if "learned" in spec.router.options.offers else None


def _kwargs(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """Plain kwargs for ``cls`` from a mapping; rejects unknown keys and a mismatched ``kind`` by name."""
    d = dict(d.items())
    kind = d.pop("kind", cls.KIND)
    if kind != cls.KIND:
        _fail("kind", kind, f"{cls.__name__} is kind {cls.KIND!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise unknown_field(f"{PREFIX}{unknown[0]}", names, cls.__name__)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{PREFIX}{missing[0]}: required field of {cls.__name__} is missing")
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """MLP classifier: flatten -> Dense(d_model) -> FFN layers -> [norm] -> Dense(num_classes).

    Attributes:
      num_classes: number of output classes.
      d_model: ``D``, the width between FFN layers (the input projection's output).
      layers: one FFN spec per layer: an ``MoEConfig`` (own experts, k, capacity, router) or an ``int``
        dense hidden width. ``[MoEConfig(E=8), 256, MoEConfig(E=4)]`` is a layer-wise schedule; a stack of
        MoE specs with ``residual=False, norm=None`` is a deep MoE (Eigen et al. 2013).
      residual: ``x + ffn(norm(x))`` (pre-norm) if True, else ``ffn(norm(x))``.
      norm: ``layernorm``, ``rmsnorm`` or None (no normalisation, also before the head).
      ffn_kind, activation, use_bias: the dense FFN layers (MoE layers use their own ``MoEConfig``).
      dropout_rate: dropout on each FFN output in training.
      dtype, param_dtype: computation and parameter dtypes of the non-MoE parts.
    """

    KIND: ClassVar[str] = "mlp"
    num_classes: int
    d_model: int = 64
    layers: tuple[FFNSpec, ...] = (256,)
    residual: bool = True
    norm: Norm | None = "layernorm"
    ffn_kind: str = "mlp"
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive_int("num_classes", self.num_classes)
        _ffn_common(self)
        if isinstance(self.layers, list):  # ConfigDict and YAML give lists; a frozen config holds a tuple
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple) or not self.layers:
            _fail("layers", self.layers, "must be a non-empty tuple of MoEConfig or int widths")
        for i, spec in enumerate(self.layers):
            if not isinstance(spec, MoEConfig):
                _positive_int(f"layers[{i}]", spec)
        _check_gating_residuals(self.layers)
        _bool("residual", self.residual)
        if self.norm is not None:
            _choice("norm", self.norm, ("layernorm", "rmsnorm"))

    def ffn_specs(self) -> tuple[FFNSpec, ...]:
        return self.layers

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MLPConfig":
        """From a plain dict or ``ConfigDict``; each ``layers`` entry is an int or an ``MoEConfig`` mapping."""
        kw = _kwargs(cls, d)
        if "layers" in kw:
            layers = kw["layers"]
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or hasattr(layers, "items"):
                _fail("layers", layers, "must be a sequence of MoEConfig mappings or int widths")
            kw["layers"] = tuple(moe_from_any(f"layers[{i}]", s) if hasattr(s, "items") or isinstance(s, MoEConfig)
                                 else s for i, s in enumerate(layers))
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """The Transformer body shared by :class:`LMConfig` and :class:`ViTConfig`.

    Attributes:
      d_model: ``D``.
      num_layers: number of blocks (attention + FFN).
      num_heads: ``H`` query heads; must divide ``d_model`` unless the attention kind sets its head width.
      attention: the attention kind and its options (:mod:`moejax.models.attention`): ``MHA()`` (default;
        ``num_kv_heads`` for GQA, ``head_dim``, ``qkv_bias``, ``qk_norm``, ``sliding_window``) or ``MLA(...)``
        (multi-head latent attention); a mapping ``{'kind': 'mha', ...}`` in a config dict.
      moe: the MoE FFN, or None for a dense baseline (every FFN dense).
      moe_every: block ``i`` (0-based) has an MoE FFN iff ``(i + 1) % moe_every == 0``: 1 = every block,
        2 = every other block starting with the second (GShard / Switch).
      dense_layers: indices of blocks whose FFN is dense although ``moe_every`` selects them (DeepSeek's first
        dense layers, Qwen2-MoE's ``mlp_only_layers``).
      dense_hidden_dim: hidden width of the dense FFNs; None = ``4 * d_model``.
      ffn_kind, activation, use_bias: the dense FFNs (MoE FFNs use ``moe``).
      norm: pre-norm kind, ``layernorm`` or ``rmsnorm``.
      norm_eps: epsilon of every norm (block, final and the attention's QK / latent norms).
      dropout_rate: dropout on the attention and FFN outputs in training.
      dtype, param_dtype: computation and parameter dtypes of the non-MoE parts.
    """

    KIND: ClassVar[str] = "transformer"
    ROTARY: ClassVar[bool] = False
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    attention: AttentionConfig = dataclasses.field(default_factory=MHA)
    moe: MoEConfig | None = None
    moe_every: int = 1
    dense_layers: tuple[int, ...] = ()
    dense_hidden_dim: int | None = None
    ffn_kind: str = "mlp"
    activation: str = "gelu"
    use_bias: bool = True
    norm: Norm = "layernorm"
    norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _ffn_common(self)
        _positive_int("num_layers", self.num_layers)
        _positive_int("num_heads", self.num_heads)
        if not isinstance(self.attention, AttentionConfig):
            _fail("attention", self.attention, "must be an attention config (e.g. MHA(), MLA(...))")
        self.attention.check(d_model=self.d_model, num_heads=self.num_heads, rotary=self.ROTARY, prefix=PREFIX)
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) \
                or not 0 < self.norm_eps < 1:
            _fail("norm_eps", self.norm_eps, "must be a number in (0, 1)")
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if not isinstance(self.dense_layers, tuple) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.dense_layers):
            _fail("dense_layers", self.dense_layers, f"must be a tuple of block indices in [0, {self.num_layers})")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            _fail("moe", self.moe, "must be an MoEConfig or None")
        _positive_int("moe_every", self.moe_every)
        if self.moe is not None and self.moe_every > self.num_layers:
            _fail("moe_every", self.moe_every, f"must be <= {PREFIX}num_layers={self.num_layers} "
                                               "(no block would be MoE; use moe=None for a dense baseline)")
        if self.dense_hidden_dim is not None:
            _positive_int("dense_hidden_dim", self.dense_hidden_dim)
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))

    @property
    def dense_width(self) -> int:
        return self.dense_hidden_dim or 4 * self.d_model

    def is_moe_block(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe_every == 0 and i not in self.dense_layers

    def ffn_specs(self) -> tuple[FFNSpec, ...]:
        return tuple(self.moe if self.is_moe_block(i) else self.dense_width for i in range(self.num_layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """From a plain dict or ``ConfigDict``; a nested ``moe`` mapping becomes ``MoEConfig.from_dict``, an
        ``attention`` mapping the attention kind it names."""
        kw = _kwargs(cls, d)
        if kw.get("moe") is not None:
            kw["moe"] = moe_from_any("moe", kw["moe"])
        if "attention" in kw:
            try:
                kw["attention"] = attention_from_any(kw["attention"])
            except ValueError as e:
                raise ValueError(f"{PREFIX}{e}") from e
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(TransformerConfig):
    """Decoder-only Transformer LM: causal attention with rotary position embeddings.

    Attributes (besides :class:`TransformerConfig`'s):
      vocab_size: ``V``.
      tie_embeddings: the output projection is the transposed token embedding.
      rope_base: the base ``theta`` of the rotary frequencies ``theta^(-2i / head_dim)``.
      rope_scaling: context-extension scaling of those frequencies (:class:`~moejax.models.attention.rope.
        RopeScaling`: ``linear`` or ``yarn``; a mapping with ``kind`` in a config dict), None for none.
    """

    KIND: ClassVar[str] = "transformer_lm"
    ROTARY: ClassVar[bool] = True
    vocab_size: int
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("vocab_size", self.vocab_size)
        _bool("tie_embeddings", self.tie_embeddings)
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) \
                or not math.isfinite(self.rope_base) or self.rope_base <= 1:
            _fail("rope_base", self.rope_base, "must be a finite number > 1")
        if hasattr(self.rope_scaling, "items"):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**dict(self.rope_scaling.items())))
            except (TypeError, ValueError) as e:
                _fail("rope_scaling", self.rope_scaling, str(e))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail("rope_scaling", self.rope_scaling, "must be None or a RopeScaling / mapping with 'kind'")

    @property
    def rope(self) -> Rope:
        """The rotary embedding settings handed to every attention layer."""
        return Rope(float(self.rope_base), self.rope_scaling)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(TransformerConfig):
    """ViT image classifier: patches -> learned positions -> non-causal Transformer -> pooled head.

    Attributes (besides :class:`TransformerConfig`'s):
      num_classes: number of output classes.
      image_size: ``(H, W)`` of the input images [B, H, W, C]; an int ``S`` means ``(S, S)``.
      channels: ``C``.
      patch_size: ``P``; must divide ``H`` and ``W``; ``N = (H / P) * (W / P)`` patches.
      patch_embed: ``conv`` (a P x P convolution with stride P) or ``dense`` (reshape + Dense); the same
        function, different parameter layouts.
      pooling: ``cls`` (a learned class token, read out after the encoder) or ``mean`` (mean over patches).
    """

    KIND: ClassVar[str] = "vit"
    num_classes: int
    image_size: tuple[int, int] | int
    channels: int = 3
    patch_size: int = 4
    patch_embed: Literal["conv", "dense"] = "conv"
    pooling: Literal["cls", "mean"] = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("num_classes", self.num_classes)
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        elif isinstance(self.image_size, list):  # ConfigDict and YAML give lists
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if not isinstance(self.image_size, tuple) or len(self.image_size) != 2:
            _fail("image_size", self.image_size, "must be a pair (H, W)")
        for i, s in enumerate(self.image_size):
            _positive_int(f"image_size[{i}]", s)
        _positive_int("channels", self.channels)
        _positive_int("patch_size", self.patch_size)
        if any(s % self.patch_size for s in self.image_size):
            _fail("patch_size", self.patch_size, f"must divide {PREFIX}image_size={self.image_size}")
        _choice("patch_embed", self.patch_embed, ("conv", "dense"))
        _choice("pooling", self.pooling, ("cls", "mean"))

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)


ModelConfig = Union[MLPConfig, LMConfig, ViTConfig]
CONFIGS: dict[str, type] = {c.KIND: c for c in (MLPConfig, LMConfig, ViTConfig)}
