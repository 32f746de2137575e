"""Parameter counts and memory of the real checkpoints of the five Hugging Face MoE families, computed by moejax
from their architectures (``jax.eval_shape``: nothing is allocated, nothing is downloaded).

    python benchmarks/pretrained_memory.py

Prints a markdown table (total and active parameters per token; GiB of parameters in bf16 and fp32; the KV cache
per 1,000 tokens of one sequence in bf16). The hyperparameters are those of the checkpoints' ``config.json`` on the
Hub, written out below so that the numbers can be checked; embeddings count once per matrix (untied head).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import DispatchConfig, MoEConfig
from moejax.models import MHA, MLA, LMConfig, TransformerLM, make_cache, param_counts
from moejax.routing.config import RouterConfig


def moe(e: int, f: int, k: int, *, renormalize: bool, shared: int = 0, shared_width: int | None = None,
        shared_gate: bool = False, **router) -> MoEConfig:
    return MoEConfig(num_experts=e, hidden_dim=f, expert_kind="glu", activation="silu", use_bias=False,
                     num_shared_experts=shared, shared_hidden_dim=shared_width, shared_gate=shared_gate,
                     router=RouterConfig(kind="topk", k=k, renormalize=renormalize, **router),
                     dispatch=DispatchConfig(mode="dropless"))


COMMON = dict(norm="rmsnorm", ffn_kind="glu", activation="silu", use_bias=False, tie_embeddings=False)
MODELS = {
    "mistralai/Mixtral-8x7B-v0.1": LMConfig(
        vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, attention=MHA(num_kv_heads=8),
        moe=moe(8, 14336, 2, renormalize=True), **COMMON),
    "Qwen/Qwen1.5-MoE-A2.7B": LMConfig(
        vocab_size=151936, d_model=2048, num_layers=24, num_heads=16, attention=MHA(qkv_bias=True),
        moe=moe(60, 1408, 4, renormalize=False, shared=1, shared_width=5632, shared_gate=True), **COMMON),
    "Qwen/Qwen3-30B-A3B": LMConfig(
        vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
        attention=MHA(num_kv_heads=4, head_dim=128, qk_norm="head"), moe=moe(128, 768, 8, renormalize=True), **COMMON),
    "allenai/OLMoE-1B-7B-0924": LMConfig(
        vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, attention=MHA(qk_norm="full"),
        moe=moe(64, 1024, 8, renormalize=False), **COMMON),
    "deepseek-ai/DeepSeek-V3": LMConfig(
        vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, dense_layers=(0, 1, 2), dense_hidden_dim=18432,
        attention=MLA(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        moe=moe(256, 2048, 8, renormalize=True, shared=1, score="sigmoid", routed_scaling=2.5, selection_bias=True,
                num_groups=8, top_groups=4, group_score="top2_sum"), **COMMON),
}


def main() -> None:
    print("| checkpoint | parameters | active per token | bf16 GiB | fp32 GiB | KV cache per 1k tokens (bf16) |")
    print("|---|---|---|---|---|---|")
    gib = 1024 ** 3
    for name, cfg in MODELS.items():
        counts = param_counts(TransformerLM(cfg), jax.ShapeDtypeStruct((1, 8), jnp.int32))
        cache = jax.eval_shape(lambda: make_cache(cfg, 1, 1000, "bfloat16"))
        cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache.layers))
        print(f"| `{name}` | {counts.total / 1e9:.2f} B | {counts.active_max / 1e9:.2f} B | "
              f"{counts.total * 2 / gib:.1f} | {counts.total * 4 / gib:.1f} | {cache_bytes / 2 ** 20:.0f} MiB |")


if __name__ == "__main__":
    main()
