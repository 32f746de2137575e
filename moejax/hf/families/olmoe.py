"""OLMoE (``OlmoeForCausalLM``): QK-norm over the full projected width (before the head split), softmax top-k
routing (renormalised only with ``norm_topk_prob``), optional biases on all four attention projections.

| HF tensor (per layer ``i``) | moejax array |
| --- | --- |
| ``self_attn.{q,k}_norm.weight`` [H*Dh], [Hkv*Dh] | ``attn/{q,k}_norm/scale`` (``qk_norm='full'``) |
| ``mlp.gate.weight`` [E, D] | ``ffn/router/kernel`` [D, E] |
| ``mlp.experts.<e>.{gate,up,down}_proj.weight`` | ``ffn/experts/{w_gate,w_up,w_down}`` [E, ...] |
"""
from __future__ import annotations

from typing import Any

from moejax.hf.config_keys import HFConfig, read_common
from moejax.hf.family import Family, register_family
from moejax.hf.families.common import (decoder_tensors, lm_config, mha, mha_of, mha_tensors, routed_moe,
                                       routed_tensors, write_common)
from moejax.hf.layout import TensorMap
from moejax.models.config import LMConfig


@register_family
class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    aliases = {"num_local_experts": "num_experts"}

    def read_config(self, c: HFConfig) -> LMConfig:
        common = read_common(c)
        c.expect("clip_qkv", (None,), "clamping q/k/v activations is not implemented")
        bias = bool(c.take("attention_bias", False))
        attention = mha(common, num_kv_heads=c.take("num_key_value_heads", None), head_dim=None, qkv_bias=bias,
                        out_bias=bias, qk_norm="full")
        moe = routed_moe(num_experts=c.take("num_experts"),
                         hidden_dim=c.take("intermediate_size"), k=c.take("num_experts_per_tok"),
                         activation=common["activation"], renormalize=bool(c.take("norm_topk_prob", False)))
        return lm_config(common, attention=attention, moe=moe)

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        att, moe = mha_of(self, cfg), cfg.moe
        out = write_common(self, cfg)
        out.update(num_key_value_heads=att.kv_heads(cfg.num_heads), attention_bias=att.qkv_bias, clip_qkv=None,
                   intermediate_size=moe.hidden_dim, num_experts=moe.num_experts, num_experts_per_tok=moe.router.k,
                   norm_topk_prob=moe.router.renormalize)
        return out

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        return decoder_tensors(cfg, mha_tensors, routed_tensors)
