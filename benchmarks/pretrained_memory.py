"""Parameter counts and memory of the real checkpoints of the five Hugging Face MoE families, computed by moejax
from their architectures (``jax.eval_shape``: nothing is allocated, nothing is downloaded).

    python benchmarks/pretrained_memory.py

Prints a markdown table (total and active parameters per token; GiB of parameters in bf16 and fp32; the KV cache
per 1,000 tokens of one sequence in bf16). The hyperparameters are those of the checkpoints' ``config.json`` on the
Hub (``moejax/aot/hf_architectures/``, read by moejax's Hugging Face families); embeddings count once per matrix
(untied head).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.aot import pretrained
from moejax.models import TransformerLM, make_cache, param_counts

# The checkpoints, in the table's order: moejax/aot/hf_architectures/<name>.json (their config.json's architecture
# fields), read by the same family code as moejax.hf.load.
NAMES = ("mixtral_8x7b", "qwen1_5_moe_a2_7b", "qwen3_30b_a3b", "olmoe_1b_7b", "deepseek_v3")
MODELS = {pretrained.SOURCES[n][0]: pretrained.lm_config(n) for n in NAMES}


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
