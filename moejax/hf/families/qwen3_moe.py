"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head QK-norm and a head width independent of ``D / H``,
softmax top-k routing (renormalised with ``norm_topk_prob``), optional dense layers (``mlp_only_layers``,
``decoder_sparse_step``), optional biases on all four attention projections (``attention_bias``).

| HF tensor (per layer ``i``) | moejax array |
| --- | --- |
| ``self_attn.{q,k}_norm.weight`` [Dh] | ``attn/{q,k}_norm/scale`` (``qk_norm='head'``) |
| ``mlp.gate.weight`` [E, D] | ``ffn/router/kernel`` [D, E] |
| ``mlp.experts.<e>.{gate,up,down}_proj.weight`` | ``ffn/experts/{w_gate,w_up,w_down}`` [E, ...] |
| ``mlp.{gate,up,down}_proj.weight`` (dense layers) | ``ffn/{w_gate,w_up,w_down}`` |
"""
from __future__ import annotations

from typing import Any

from moejax.hf.config_keys import HFConfig, read_common
from moejax.hf.family import Family, register_family
from moejax.hf.families.common import (decoder_tensors, lm_config, mha, mha_of, mha_tensors, read_no_sliding_window,
                                       read_sparse_layout, routed_moe, routed_tensors, write_common,
                                       write_sparse_layout)
from moejax.hf.layout import TensorMap
from moejax.models.config import LMConfig


@register_family
class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    aliases = {"num_local_experts": "num_experts"}

    def read_config(self, c: HFConfig) -> LMConfig:
        common = read_common(c)
        read_no_sliding_window(c)
        bias = bool(c.take("attention_bias", False))
        attention = mha(common, num_kv_heads=c.take("num_key_value_heads", None),
                        head_dim=c.take("head_dim", None), qkv_bias=bias, out_bias=bias, qk_norm="head")
        moe = routed_moe(num_experts=c.take("num_experts"),
                         hidden_dim=c.take("moe_intermediate_size"), k=c.take("num_experts_per_tok"),
                         activation=common["activation"], renormalize=bool(c.take("norm_topk_prob", False)))
        return lm_config(common, attention=attention, moe=moe, **read_sparse_layout(c))

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        att, moe = mha_of(self, cfg), cfg.moe
        out = write_common(self, cfg)
        out.update(num_key_value_heads=att.kv_heads(cfg.num_heads), head_dim=att.head_width(cfg.d_model, cfg.num_heads),
                   attention_bias=att.qkv_bias, use_sliding_window=False,
                   moe_intermediate_size=moe.hidden_dim, num_experts=moe.num_experts,
                   num_experts_per_tok=moe.router.k, norm_topk_prob=moe.router.renormalize, **write_sparse_layout(cfg))
        return out

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        return decoder_tensors(cfg, mha_tensors, routed_tensors)
