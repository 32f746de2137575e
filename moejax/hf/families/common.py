"""Pieces the decoder-only families share: their config keys, MoE configs and tensor maps.

Shapes: ``V`` vocabulary, ``D`` width, ``H`` query heads, ``Hkv`` key/value heads, ``Dh`` head width, ``E``
experts, ``F`` expert (or dense FFN) width. HF ``nn.Linear`` weights are ``[out, in]``; every map below says which
moejax array it fills (see :mod:`moejax.hf.layout`).
"""
from __future__ import annotations

from typing import Any

from moejax.config import DispatchConfig, MoEConfig
from moejax.hf.config_keys import HFConfig, hub_rope
from moejax.hf.family import Family, fail_export
from moejax.hf.layout import TensorMap, linear, same, vector
from moejax.models.attention import MHA
from moejax.models.config import LMConfig
from moejax.routing.config import RouterConfig

GLU = ("gate_proj", "up_proj", "down_proj")
"""HF names of a SwiGLU MLP's projections, in moejax's (w_gate, w_up, w_down) order."""
HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def block(i: int, *parts: str) -> tuple[str, ...]:
    """The parameter path of block ``i``: ``('params', 'decoder', 'block_<i>', *parts)``."""
    return ("params", "decoder", f"block_{i}", *parts)


def routed_moe(*, num_experts: int, hidden_dim: int, k: int, activation: str, renormalize: bool,
               shared_width: int = 0, shared_experts: int = 1, shared_gate: bool = False,
               **router: Any) -> MoEConfig:
    """A SwiGLU-expert MoE FFN without biases, dropless (the parity-exact dispatch), with a top-k router.

    ``shared_width``: total hidden width of the shared experts (0: none), split into ``shared_experts`` experts;
    ``router``: further router fields (``score``, ``routed_scaling``, ``selection_bias``, group limits)."""
    shared = dict(num_shared_experts=shared_experts, shared_hidden_dim=shared_width // shared_experts,
                  shared_gate=shared_gate) if shared_width else {}
    return MoEConfig(num_experts=num_experts, hidden_dim=hidden_dim, expert_kind="glu", activation=activation,
                     use_bias=False, router=RouterConfig(k=k, renormalize=renormalize, **router),
                     dispatch=DispatchConfig(mode="dropless"), **shared)


def lm_config(common: dict[str, Any], **fields: Any) -> LMConfig:
    """An ``LMConfig`` from :func:`~moejax.hf.config_keys.read_common`'s keys plus the family's fields; dense FFNs
    are SwiGLU without biases, like every family's MLP."""
    return LMConfig(**{**common, "ffn_kind": "glu", "use_bias": False, **fields})


def write_common(family: Family, cfg: LMConfig) -> dict[str, Any]:
    """The keys every family shares, from ``cfg``; refuses what no family here can express."""
    if cfg.moe is None:
        raise fail_export(family, "moe", None, "the family's checkpoints have MoE layers")
    if cfg.moe.activation not in HF_ACTIVATION:
        raise fail_export(family, "moe.activation", cfg.moe.activation, f"HF hidden_act knows {sorted(HF_ACTIVATION)}")
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": HF_ACTIVATION[cfg.moe.activation], **hub_rope(cfg.rope_base, cfg.rope_scaling)}


def mha(common: dict[str, Any], *, num_kv_heads: int | None, head_dim: int | None, **options: Any) -> MHA:
    """Multi-head attention with defaults left as None (``num_kv_heads`` = H, ``head_dim`` = D / H), so that a
    config that spells them out and one that leaves them out give equal ``LMConfig``s."""
    d, h = common["d_model"], common["num_heads"]
    return MHA(num_kv_heads=None if num_kv_heads == h else num_kv_heads,
               head_dim=None if head_dim is not None and d % h == 0 and head_dim == d // h else head_dim, **options)


def mha_of(family: Family, cfg: LMConfig) -> MHA:
    """``cfg.attention`` when it is multi-head attention (every family but DeepSeek's)."""
    if not isinstance(cfg.attention, MHA):
        raise fail_export(family, "attention.kind", cfg.attention.KIND, "the family uses multi-head attention")
    return cfg.attention


def read_sparse_layout(c: HFConfig) -> dict[str, Any]:
    """Qwen's ``decoder_sparse_step`` and ``mlp_only_layers`` as ``moe_every`` / ``dense_layers``, and the dense
    layers' width ``intermediate_size``."""
    return dict(moe_every=c.take("decoder_sparse_step", 1), dense_layers=tuple(c.take("mlp_only_layers", None) or ()),
                dense_hidden_dim=c.take("intermediate_size"))


def write_sparse_layout(cfg: LMConfig) -> dict[str, Any]:
    return {"decoder_sparse_step": cfg.moe_every, "mlp_only_layers": list(cfg.dense_layers),
            "intermediate_size": cfg.dense_width}


def read_no_sliding_window(c: HFConfig) -> None:
    """Qwen's sliding-window switch: only ``use_sliding_window: false`` (then ``sliding_window`` and
    ``max_window_layers`` do nothing) and only full-attention ``layer_types``."""
    c.expect("use_sliding_window", (False,), "per-layer sliding windows (max_window_layers) are not implemented",
             default=False)
    c.ignore("sliding_window", "max_window_layers")
    types = c.take("layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        bad = next(t for t in types if t != "full_attention")
        raise ValueError(f"config.json: layer_types=[..., {bad!r}, ...]: not supported (only full_attention layers)")


# ---- tensor maps -------------------------------------------------------------------------------------------------

def embeddings(cfg: LMConfig) -> list[TensorMap]:
    """Token embedding [V, D], final norm [D], and the untied ``lm_head`` [V, D] -> ``head/kernel`` [D, V]."""
    v, d = cfg.vocab_size, cfg.d_model
    maps = [same(("params", "embed", "embedding"), "model.embed_tokens.weight", (v, d)),
            vector(("params", "decoder", "final_norm", "scale"), "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        maps.append(linear(("params", "head", "kernel"), "lm_head.weight", (d,), (v,)))
    return maps


def block_norms(i: int, cfg: LMConfig) -> list[TensorMap]:
    """The pre-attention and pre-FFN RMSNorm weights [D] of layer ``i``."""
    p, d = f"model.layers.{i}.", cfg.d_model
    return [vector(block(i, "attn_norm", "scale"), p + "input_layernorm.weight", (d,)),
            vector(block(i, "ffn_norm", "scale"), p + "post_attention_layernorm.weight", (d,))]


def mha_tensors(i: int, cfg: LMConfig) -> list[TensorMap]:
    """``self_attn.{q,k,v}_proj`` [H(kv)*Dh, D] -> ``{query,key,value}/kernel`` [D, H(kv), Dh] (+ biases [H(kv)*Dh]
    -> [H(kv), Dh]); ``o_proj`` [D, H*Dh] -> ``out/kernel`` [H, Dh, D] (+ bias [D]); QK-norm weights [Dh]
    (per head) or [H(kv)*Dh] (full width) as they are."""
    att: MHA = cfg.attention
    d, h = cfg.d_model, cfg.num_heads
    hkv, dh = att.kv_heads(h), att.head_width(d, h)
    p = f"model.layers.{i}.self_attn."
    maps = []
    for name, hf, heads in (("query", "q_proj", h), ("key", "k_proj", hkv), ("value", "v_proj", hkv)):
        maps.append(linear(block(i, "attn", name, "kernel"), f"{p}{hf}.weight", (d,), (heads, dh)))
        if att.qkv_bias:
            maps.append(vector(block(i, "attn", name, "bias"), f"{p}{hf}.bias", (heads, dh)))
    maps.append(linear(block(i, "attn", "out", "kernel"), p + "o_proj.weight", (h, dh), (d,)))
    if att.out_bias:
        maps.append(vector(block(i, "attn", "out", "bias"), p + "o_proj.bias", (d,)))
    if att.qk_norm is not None:
        widths = (dh, dh) if att.qk_norm == "head" else (h * dh, hkv * dh)
        for name, width in zip(("q_norm", "k_norm"), widths):
            maps.append(vector(block(i, "attn", name, "scale"), f"{p}{name}.weight", (width,)))
    return maps


def glu_tensors(path: tuple[str, ...], hf_prefix: str, d: int, f: int, names: tuple[str, str, str] = GLU,
                experts: int | None = None) -> list[TensorMap]:
    """A SwiGLU MLP ``<hf_prefix>.{gate,up,down}`` ([F, D], [F, D], [D, F]) -> ``w_gate``, ``w_up`` [D, F],
    ``w_down`` [F, D] under ``path``; with ``experts`` stacked [E, ...] from ``hf_prefix`` with ``{e}``."""
    gate, up, down = names
    return [linear((*path, "w_gate"), f"{hf_prefix}.{gate}.weight", (d,), (f,), experts),
            linear((*path, "w_up"), f"{hf_prefix}.{up}.weight", (d,), (f,), experts),
            linear((*path, "w_down"), f"{hf_prefix}.{down}.weight", (f,), (d,), experts)]


def router_tensor(i: int, hf: str, d: int, e: int) -> TensorMap:
    """The router weight [E, D] -> ``ffn/router/kernel`` [D, E]."""
    return linear(block(i, "ffn", "router", "kernel"), hf, (d,), (e,))


def routed_tensors(i: int, cfg: LMConfig, spec: MoEConfig, module: str = "mlp",
                   names: tuple[str, str, str] = GLU) -> list[TensorMap]:
    """Block ``i``'s router ``model.layers.<i>.<module>.gate.weight`` and its stacked SwiGLU experts
    ``<module>.experts.{e}.<names>`` (the layout Mixtral, Qwen-MoE and OLMoE share)."""
    p, d, e = f"model.layers.{i}.{module}", cfg.d_model, spec.num_experts
    return [router_tensor(i, p + ".gate.weight", d, e),
            *glu_tensors(block(i, "ffn", "experts"), p + ".experts.{e}", d, spec.hidden_dim, names, experts=e)]


def decoder_tensors(cfg: LMConfig, attention, moe_ffn) -> list[TensorMap]:
    """Embeddings, then per layer its norms, ``attention(i, cfg)`` and either ``moe_ffn(i, cfg, spec)`` or the dense
    SwiGLU ``model.layers.<i>.mlp`` -> ``ffn/w_*``."""
    maps = embeddings(cfg)
    for i, spec in enumerate(cfg.ffn_specs()):
        maps += block_norms(i, cfg) + attention(i, cfg)
        if isinstance(spec, MoEConfig):
            maps += moe_ffn(i, cfg, spec)
        else:
            maps += glu_tensors(block(i, "ffn"), f"model.layers.{i}.mlp", cfg.d_model, spec)
    return maps

