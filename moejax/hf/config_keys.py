"""Reading a Hugging Face ``config.json`` so that no key is silently ignored.

Every key of a config is, for its family, exactly one of: *mapped* (it becomes a field of the moejax config),
*ignored* because it does not change inference (:data:`NO_INFERENCE_EFFECT` and a family's own list: token ids,
training-only coefficients, bookkeeping), or *refused* because its value changes the math and moejax does not
implement it. A key that is none of these is an error too, so a new upstream option cannot be dropped unnoticed.
Every error is one line starting with ``config.json: <key>``.

Both config forms are read: the Hub's (transformers 4.x: top-level ``rope_theta`` and ``rope_scaling``) and the
transformers-5 one (``rope_parameters = {'rope_type': 'default', 'rope_theta': ...}``).
"""
from __future__ import annotations

from typing import Any, Mapping

from moejax.errors import closest
from moejax.models.attention.rope import RopeScaling

# Keys that never change what a causal LM computes from token ids at inference.
NO_INFERENCE_EFFECT = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "model_type",
    "torch_dtype", "dtype",                                   # storage dtype: the load dtype comes from the files
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "output_router_logits",
    "initializer_range", "attention_dropout", "router_aux_loss_coef",
    "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class",
    "max_position_embeddings",                                # only a bound; default RoPE does not depend on it
    "pretraining_tp",                                         # splits matmuls in the reference code, same result
})

# HF ``hidden_act`` -> moejax activation (``gelu`` is the exact erf form in both).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "relu": "relu"}

_REQUIRED = object()


def refuse(key: str, value: Any, why: str) -> ValueError:
    """``config.json: <key>=<value>: not supported (<why>)`` as a ValueError (the caller raises it)."""
    return ValueError(f"config.json: {key}={value!r}: not supported ({why})")


class HFConfig:
    """A ``config.json`` mapping whose keys are ticked off as a family reads them.

    ``take`` reads a mapped key, ``ignore`` declares keys that do not affect inference, ``expect`` reads a key whose
    only supported values are given, and :meth:`finish` raises for the first key nobody claimed.
    """

    def __init__(self, data: Mapping[str, Any], family: str, aliases: Mapping[str, str] | None = None):
        self.data = dict(data)
        self.family = family
        self.aliases = dict(aliases or {})     # other spelling -> the Hub's key (transformers' attribute_map)
        self._claimed: set[str] = set()

    def take(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of ``key`` (or of an alias of it, e.g. transformers-5's ``num_local_experts`` for Qwen3-MoE's
        ``num_experts``); ``default`` when absent, a one-line error when absent and required."""
        names = (key, *sorted(a for a, k in self.aliases.items() if k == key))
        self._claimed.update(names)
        present = [n for n in names if n in self.data]
        values = {repr(self.data[n]) for n in present}
        if len(values) > 1:
            raise ValueError(f"config.json: {present[0]}={self.data[present[0]]!r} and {present[1]}="
                             f"{self.data[present[1]]!r}: aliases of one setting disagree")
        if present:
            return self.data[present[0]]
        if default is _REQUIRED:
            raise ValueError(f"config.json: {key}: missing (required for model_type={self.family!r})")
        return default

    def expect(self, key: str, allowed: tuple[Any, ...], why: str, default: Any = None) -> Any:
        """The value of ``key`` when it is one of ``allowed`` (absent reads as ``default``); otherwise the refusal
        ``config.json: key=value: not supported (why)``."""
        value = self.take(key, default)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):   # False is not 0 here
            raise refuse(key, value, why)
        return value

    def ignore(self, *keys: str) -> None:
        """Declares keys that do not change inference (when present)."""
        self._claimed.update(keys)

    def finish(self) -> None:
        """Raises for the first key of the config that no reader claimed."""
        unknown = sorted(set(self.data) - self._claimed)
        if unknown:
            key = unknown[0]
            raise ValueError(f"config.json: {key}={self.data[key]!r}: unknown key for model_type={self.family!r}"
                             f"{closest(key, self._claimed)}; moejax does not know whether it changes the model")


def read_common(c: HFConfig) -> dict[str, Any]:
    """The keys every family shares, as ``LMConfig`` keyword arguments (plus ``activation`` for the experts).

    Refuses quantized checkpoints and RoPE variants other than default, linear and YaRN."""
    c.ignore(*NO_INFERENCE_EFFECT)
    quant = c.take("quantization_config", None)
    if quant is not None:
        raise refuse("quantization_config", quant, "quantized weights; use a dequantized (bf16/fp32) checkpoint")
    act = c.take("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise refuse("hidden_act", act, f"supported: {sorted(ACTIVATIONS)}")
    return dict(d_model=c.take("hidden_size"), num_layers=c.take("num_hidden_layers"),
                num_heads=c.take("num_attention_heads"), vocab_size=c.take("vocab_size"),
                norm="rmsnorm", norm_eps=float(c.take("rms_norm_eps")),
                tie_embeddings=bool(c.take("tie_word_embeddings", False)), **dict(zip(("rope_base", "rope_scaling"),
                                                                                      read_rope(c))),
                activation=ACTIVATIONS[act])


SCALING_KEYS = {"linear": {"factor"},
                "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                         "mscale_all_dim", "attention_factor", "truncate"}}


def read_rope(c: HFConfig) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` and the scaling (``linear`` or ``yarn``, :class:`~moejax.models.attention.rope.RopeScaling`) from
    either form. Dynamic NTK, LongRoPE, Llama-3 scaling and partial rotary factors are refused by name."""
    theta, scaling = c.take("rope_theta", None), None
    for key in ("rope_parameters", "rope_scaling"):
        params = c.take(key, None)
        if params is None:
            continue
        kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, Mapping) else None
        options = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")} \
            if isinstance(params, Mapping) else {}
        if kind == "default" and options:
            raise refuse(key, params, f"default RoPE with extra keys {sorted(options)}")
        if kind not in ("default", *SCALING_KEYS):
            raise refuse(key, params, f"RoPE type {kind!r}; implemented: default, {', '.join(SCALING_KEYS)}")
        if kind != "default":
            unknown = set(options) - SCALING_KEYS[kind]
            if unknown:
                raise refuse(key, params, f"{kind} RoPE keys {sorted(unknown)} are not implemented")
            if options.get("factor") is None:
                raise refuse(key, params, "needs an explicit 'factor'")
            try:
                new = RopeScaling(kind=kind, **{k: v for k, v in options.items() if v is not None})
            except ValueError as e:
                raise refuse(key, params, str(e)) from e
            if scaling is not None and scaling != new:
                raise ValueError(f"config.json: rope_scaling and rope_parameters disagree ({params})")
            scaling = new
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ValueError(f"config.json: rope_theta={theta!r} and {key}.rope_theta={params['rope_theta']!r}: "
                                 f"disagree")
            theta = params["rope_theta"]
    if theta is None:
        raise ValueError("config.json: rope_theta: missing (neither rope_theta nor rope_parameters.rope_theta)")
    return float(theta), scaling


def hub_rope(rope_base: float, scaling: RopeScaling | None = None) -> dict[str, Any]:
    """The RoPE keys of the Hub (transformers 4.x) form."""
    if scaling is None:
        return {"rope_theta": float(rope_base), "rope_scaling": None}
    fields = {k: getattr(scaling, k) for k in sorted(SCALING_KEYS[scaling.kind])}
    defaults = RopeScaling(kind=scaling.kind, factor=1.0, original_max_position_embeddings=1)
    kept = {k: v for k, v in fields.items() if k == "factor" or k == "original_max_position_embeddings"
            or v != getattr(defaults, k)}
    return {"rope_theta": float(rope_base), "rope_scaling": {"type": scaling.kind, **kept}}


def to_hub_form(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config in the Hub form: ``rope_parameters`` (default RoPE) becomes ``rope_theta`` + ``rope_scaling: null``.
    Anything else is kept as it is."""
    out = dict(data)
    params = out.pop("rope_parameters", None)
    if isinstance(params, Mapping) and params.get("rope_type", "default") == "default" and "rope_theta" in params:
        out.setdefault("rope_theta", params["rope_theta"])
        out.setdefault("rope_scaling", None)
    elif params is not None:
        out["rope_parameters"] = params
    return out
