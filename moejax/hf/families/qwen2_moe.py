"""Qwen2-MoE / Qwen1.5-MoE (``Qwen2MoeForCausalLM``): GQA with query/key/value biases (``qkv_bias``, no output
bias), softmax top-k routing (renormalised with ``norm_topk_prob``), one shared expert scaled per token by
``sigmoid(shared_expert_gate(x))``, optional dense layers (``mlp_only_layers``, ``decoder_sparse_step``).

| HF tensor (per layer ``i``) | moejax array |
| --- | --- |
| ``self_attn.{q,k,v}_proj.bias`` [H(kv)*Dh] | ``attn/{query,key,value}/bias`` [H(kv), Dh] |
| ``mlp.gate.weight`` [E, D] | ``ffn/router/kernel`` [D, E] |
| ``mlp.experts.<e>.{gate,up,down}_proj.weight`` | ``ffn/experts/{w_gate,w_up,w_down}`` [E, ...] |
| ``mlp.shared_expert.{gate,up,down}_proj.weight`` | ``ffn/shared/{w_gate,w_up,w_down}`` |
| ``mlp.shared_expert_gate.weight`` [1, D] | ``ffn/shared_gate/kernel`` [D, 1] |
"""
from __future__ import annotations

from typing import Any

from moejax.config import MoEConfig
from moejax.hf.config_keys import HFConfig, read_common, refuse
from moejax.hf.family import Family, fail_export, register_family
from moejax.hf.families.common import (block, decoder_tensors, glu_tensors, lm_config, mha, mha_of, mha_tensors,
                                       read_no_sliding_window, read_sparse_layout, routed_moe, routed_tensors,
                                       write_common, write_sparse_layout)
from moejax.hf.layout import TensorMap, linear
from moejax.models.config import LMConfig


@register_family
class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    aliases = {"num_local_experts": "num_experts"}

    def read_config(self, c: HFConfig) -> LMConfig:
        common = read_common(c)
        read_no_sliding_window(c)
        attention = mha(common, num_kv_heads=c.take("num_key_value_heads", None),
                        head_dim=c.take("head_dim", None), qkv_bias=bool(c.take("qkv_bias", True)))
        shared = c.take("shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared < 1:
            raise refuse("shared_expert_intermediate_size", shared, "the shared expert needs a width >= 1")
        moe = routed_moe(num_experts=c.take("num_experts"),
                         hidden_dim=c.take("moe_intermediate_size"), k=c.take("num_experts_per_tok"),
                         activation=common["activation"], renormalize=bool(c.take("norm_topk_prob", False)),
                         shared_width=shared, shared_gate=True)
        return lm_config(common, attention=attention, moe=moe, **read_sparse_layout(c))

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        att, moe = mha_of(self, cfg), cfg.moe
        if not moe.shared_width:
            raise fail_export(self, "moe.num_shared_experts", moe.num_shared_experts, "the family has a gated shared "
                                                                                     "expert in every MoE layer")
        out = write_common(self, cfg)
        head_dim = att.head_width(cfg.d_model, cfg.num_heads)
        if head_dim != cfg.d_model // cfg.num_heads:        # the Hub configs leave it out when it is D / H
            out["head_dim"] = head_dim
        out.update(num_key_value_heads=att.kv_heads(cfg.num_heads), qkv_bias=att.qkv_bias, use_sliding_window=False,
                   moe_intermediate_size=moe.hidden_dim,
                   shared_expert_intermediate_size=moe.shared_width, num_experts=moe.num_experts,
                   num_experts_per_tok=moe.router.k, norm_topk_prob=moe.router.renormalize, **write_sparse_layout(cfg))
        return out

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        return decoder_tensors(cfg, mha_tensors, self._moe)

    @staticmethod
    def _moe(i: int, cfg: LMConfig, spec: MoEConfig) -> list[TensorMap]:
        p, d = f"model.layers.{i}.mlp", cfg.d_model
        return [*routed_tensors(i, cfg, spec),
                *glu_tensors(block(i, "ffn", "shared"), p + ".shared_expert", d, spec.shared_width),
                linear(block(i, "ffn", "shared_gate", "kernel"), p + ".shared_expert_gate.weight", (d,), (1,))]
