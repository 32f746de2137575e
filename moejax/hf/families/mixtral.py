"""Mixtral (``MixtralForCausalLM``): GQA with an optional sliding window, softmax top-k routing renormalised over
the chosen experts, SwiGLU experts named ``w1`` (gate), ``w3`` (up), ``w2`` (down).

| HF tensor (per layer ``i``) | moejax array |
| --- | --- |
| ``self_attn.{q,k,v,o}_proj.weight`` | ``attn/{query,key,value,out}/kernel`` |
| ``block_sparse_moe.gate.weight`` [E, D] | ``ffn/router/kernel`` [D, E] |
| ``block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`` | ``ffn/experts/{w_gate,w_up,w_down}`` [E, ...] |
"""
from __future__ import annotations

from typing import Any

from moejax.config import MoEConfig
from moejax.hf.config_keys import HFConfig, read_common
from moejax.hf.family import Family, register_family
from moejax.hf.families.common import (decoder_tensors, lm_config, mha, mha_of, mha_tensors, routed_moe,
                                       routed_tensors, write_common)
from moejax.hf.layout import TensorMap
from moejax.models.config import LMConfig


@register_family
class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    aliases = {"num_experts": "num_local_experts"}

    def read_config(self, c: HFConfig) -> LMConfig:
        common = read_common(c)
        c.ignore("router_jitter_noise")          # multiplicative input noise, training only
        attention = mha(common, num_kv_heads=c.take("num_key_value_heads", None),
                        head_dim=c.take("head_dim", None), sliding_window=c.take("sliding_window", None))
        moe = routed_moe(num_experts=c.take("num_local_experts"),
                         hidden_dim=c.take("intermediate_size"), k=c.take("num_experts_per_tok"),
                         activation=common["activation"], renormalize=True)
        return lm_config(common, attention=attention, moe=moe)

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        att, moe = mha_of(self, cfg), cfg.moe
        out = write_common(self, cfg)
        # head_dim: None means D / H in both (transformers: ``head_dim or hidden_size // num_attention_heads``)
        out.update(num_key_value_heads=att.kv_heads(cfg.num_heads), head_dim=att.head_dim,
                   sliding_window=att.sliding_window, intermediate_size=moe.hidden_dim,
                   num_local_experts=moe.num_experts, num_experts_per_tok=moe.router.k)
        return out

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        return decoder_tensors(cfg, mha_tensors, self._moe)

    @staticmethod
    def _moe(i: int, cfg: LMConfig, spec: MoEConfig) -> list[TensorMap]:
        return routed_tensors(i, cfg, spec, "block_sparse_moe", ("w1", "w3", "w2"))
