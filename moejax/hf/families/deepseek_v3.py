"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention, the first ``first_k_dense_replace`` layers
dense, then MoE layers with sigmoid scores, the ``e_score_correction_bias`` added for the choice only
(``moe_state``), group-limited selection (``n_group`` groups scored by the sum of their top two, ``topk_group``
kept), weights from the unbiased scores renormalised and times ``routed_scaling_factor``, and shared experts.

| HF tensor (per layer ``i``) | moejax array |
| --- | --- |
| ``self_attn.q_a_proj.weight`` [Rq, D] | ``attn/q_a/kernel`` [D, Rq] |
| ``self_attn.q_a_layernorm.weight`` [Rq] | ``attn/q_norm/scale`` |
| ``self_attn.q_b_proj.weight`` [H*(Dn+Dr), Rq] | ``attn/q_b/kernel`` [Rq, H, Dn+Dr] |
| ``self_attn.q_proj.weight`` (no ``q_lora_rank``) | ``attn/query/kernel`` [D, H, Dn+Dr] |
| ``self_attn.kv_a_proj_with_mqa.weight`` [R+Dr, D] | ``attn/kv_a/kernel`` [D, R+Dr] |
| ``self_attn.kv_a_layernorm.weight`` [R] | ``attn/kv_norm/scale`` |
| ``self_attn.kv_b_proj.weight`` [H*(Dn+Dv), R] | ``attn/kv_b/kernel`` [R, H, Dn+Dv] |
| ``self_attn.o_proj.weight`` [D, H*Dv] | ``attn/out/kernel`` [H, Dv, D] |
| ``mlp.gate.weight`` [E, D] | ``ffn/router/kernel`` [D, E] |
| ``mlp.gate.e_score_correction_bias`` [E] | ``moe_state/.../ffn/router/selection_bias`` |
| ``mlp.experts.<e>.{gate,up,down}_proj.weight`` | ``ffn/experts/{w_gate,w_up,w_down}`` [E, ...] |
| ``mlp.shared_experts.{gate,up,down}_proj.weight`` | ``ffn/shared/{w_gate,w_up,w_down}`` |
| ``mlp.{gate,up,down}_proj.weight`` (dense layers) | ``ffn/{w_gate,w_up,w_down}`` |

Multi-token-prediction layers (``num_nextn_predict_layers``; tensors ``model.layers.<L + j>.*``) are not part of
the causal LM: their tensors are skipped on import and not written on export.
"""
from __future__ import annotations

from typing import Any, Mapping

from moejax.config import MoEConfig
from moejax.hf.config_keys import HFConfig, read_common, refuse
from moejax.hf.family import Family, fail_export, register_family
from moejax.hf.families.common import block, decoder_tensors, glu_tensors, lm_config, routed_moe, router_tensor, \
    write_common
from moejax.hf.layout import TensorMap, linear, vector
from moejax.models.attention import MLA
from moejax.models.config import LMConfig

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6
MTP_KEY, MTP_ALIAS = "num_nextn_predict_layers", "num_mtp_layers"      # the Hub's key, transformers-5's


@register_family
class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    aliases = {"num_local_experts": "n_routed_experts", MTP_ALIAS: MTP_KEY}

    def read_config(self, c: HFConfig) -> LMConfig:
        common = read_common(c)
        c.ignore("ep_size", "aux_loss_alpha", "seq_aux")       # expert-parallel size and training-only loss weights
        c.take(MTP_KEY, 0)                                     # MTP layers: their tensors are skipped
        c.expect("scoring_func", ("sigmoid",), "only DeepSeek-V3's sigmoid scores", default="sigmoid")
        c.expect("topk_method", ("noaux_tc",), "only the bias-corrected group-limited top-k", default="noaux_tc")
        c.expect("moe_layer_freq", (1,), "transformers makes every layer after first_k_dense_replace MoE", default=1)
        c.expect("attention_bias", (False,), "moejax's MLA has no projection biases", default=False)
        h = common["num_heads"]
        c.expect("num_key_value_heads", (None, h), "MLA has one key/value head per query head", default=None)
        nope, rope = c.take("qk_nope_head_dim"), c.take("qk_rope_head_dim")
        c.expect("head_dim", (None, rope), "transformers rotates head_dim = qk_rope_head_dim channels", default=None)
        c.expect("qk_head_dim", (None, nope + rope), "must be qk_nope_head_dim + qk_rope_head_dim", default=None)
        attention = MLA(q_lora_rank=c.take("q_lora_rank", None), kv_lora_rank=c.take("kv_lora_rank"),
                        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=c.take("v_head_dim"),
                        rope_interleave=bool(c.take("rope_interleave", True)), latent_norm_eps=LATENT_NORM_EPS)
        width, shared = c.take("moe_intermediate_size"), c.take("n_shared_experts", None)
        if not isinstance(shared, int) or shared < 1:
            raise refuse("n_shared_experts", shared, "transformers builds a shared MLP in every MoE layer")
        groups, top = c.take("n_group", None) or 1, c.take("topk_group", None)
        top = groups if top is None else top
        limit = dict(num_groups=groups, top_groups=top, group_score="top2_sum") if top < groups else {}
        moe = routed_moe(num_experts=c.take("n_routed_experts"), hidden_dim=width,
                         k=c.take("num_experts_per_tok"), activation=common["activation"],
                         renormalize=bool(c.take("norm_topk_prob", True)), shared_width=shared * width,
                         shared_experts=shared, score="sigmoid",
                         routed_scaling=float(c.take("routed_scaling_factor", 1.0)), selection_bias=True, **limit)
        first_dense = c.take("first_k_dense_replace", 0)
        return lm_config(common, attention=attention, moe=moe, dense_layers=tuple(range(first_dense)),
                         dense_hidden_dim=c.take("intermediate_size"))

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        att, moe = cfg.attention, cfg.moe
        if not isinstance(att, MLA):
            raise fail_export(self, "attention.kind", att.KIND, "the family uses multi-head latent attention")
        out = write_common(self, cfg)
        if moe.shared_width % moe.hidden_dim or not moe.shared_width:
            raise fail_export(self, "moe.shared_hidden_dim", moe.shared_hidden_dim,
                              f"the shared MLP's width must be n_shared_experts >= 1 times hidden_dim={moe.hidden_dim}")
        router = moe.router
        limited = router.top_groups is not None and router.top_groups < router.num_groups
        specs = cfg.ffn_specs()
        first_dense = next((i for i, s in enumerate(specs) if isinstance(s, MoEConfig)), len(specs))
        out.update(num_key_value_heads=cfg.num_heads, q_lora_rank=att.q_lora_rank, kv_lora_rank=att.kv_lora_rank,
                   qk_nope_head_dim=att.qk_nope_head_dim, qk_rope_head_dim=att.qk_rope_head_dim,
                   v_head_dim=att.v_head_dim, rope_interleave=att.rope_interleave, attention_bias=False,
                   n_routed_experts=moe.num_experts, moe_intermediate_size=moe.hidden_dim,
                   n_shared_experts=moe.shared_width // moe.hidden_dim, num_experts_per_tok=router.k,
                   n_group=router.num_groups if limited else 1, topk_group=router.top_groups if limited else 1,
                   norm_topk_prob=router.renormalize, routed_scaling_factor=float(router.routed_scaling),
                   scoring_func="sigmoid", topk_method="noaux_tc", first_k_dense_replace=first_dense,
                   intermediate_size=cfg.dense_width, num_nextn_predict_layers=0)
        return out

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        return decoder_tensors(cfg, self._attention, self._moe)

    def skipped(self, name: str, hf_config: Mapping[str, Any]) -> bool:
        mtp = hf_config.get(MTP_KEY) or hf_config.get(MTP_ALIAS) or 0
        first = hf_config["num_hidden_layers"]
        return any(name.startswith(f"model.layers.{first + j}.") for j in range(mtp))

    @staticmethod
    def _attention(i: int, cfg: LMConfig) -> list[TensorMap]:
        att: MLA = cfg.attention
        d, h, p = cfg.d_model, cfg.num_heads, f"model.layers.{i}.self_attn."
        qk, r, dr = att.qk_nope_head_dim + att.qk_rope_head_dim, att.kv_lora_rank, att.qk_rope_head_dim
        if att.q_lora_rank is None:
            query = [linear(block(i, "attn", "query", "kernel"), p + "q_proj.weight", (d,), (h, qk))]
        else:
            rq = att.q_lora_rank
            query = [linear(block(i, "attn", "q_a", "kernel"), p + "q_a_proj.weight", (d,), (rq,)),
                     vector(block(i, "attn", "q_norm", "scale"), p + "q_a_layernorm.weight", (rq,)),
                     linear(block(i, "attn", "q_b", "kernel"), p + "q_b_proj.weight", (rq,), (h, qk))]
        return [*query,
                linear(block(i, "attn", "kv_a", "kernel"), p + "kv_a_proj_with_mqa.weight", (d,), (r + dr,)),
                vector(block(i, "attn", "kv_norm", "scale"), p + "kv_a_layernorm.weight", (r,)),
                linear(block(i, "attn", "kv_b", "kernel"), p + "kv_b_proj.weight", (r,),
                       (h, att.qk_nope_head_dim + att.v_head_dim)),
                linear(block(i, "attn", "out", "kernel"), p + "o_proj.weight", (h, att.v_head_dim), (d,))]

    @staticmethod
    def _moe(i: int, cfg: LMConfig, spec: MoEConfig) -> list[TensorMap]:
        p, d, e = f"model.layers.{i}.mlp", cfg.d_model, spec.num_experts
        bias_path = ("moe_state", "decoder", f"block_{i}", "ffn", "router", "selection_bias")
        return [router_tensor(i, p + ".gate.weight", d, e),
                vector(bias_path, p + ".gate.e_score_correction_bias", (e,)),
                *glu_tensors(block(i, "ffn", "experts"), p + ".experts.{e}", d, spec.hidden_dim, experts=e),
                *glu_tensors(block(i, "ffn", "shared"), p + ".shared_experts", d, spec.shared_width)]
