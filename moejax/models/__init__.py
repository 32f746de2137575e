"""Models built from typed configs: MLP classifier, decoder-only Transformer LM, ViT classifier.

Each model returns ``(logits, stats)`` with ``stats`` a tuple of one :class:`~moejax.routing.RoutingStats`
per FFN layer in layer order (``RoutingStats.dense()`` for dense FFNs); ``deterministic=False`` is training.
``build_model(model_cfg, num_classes=..., vocab_size=..., input_shape=...)`` dispatches on
``model_cfg['kind']`` in ``mlp``, ``transformer_lm``, ``vit``.
"""
from moejax.models.attention import (MHA, MLA, KVCache, SelfAttention, apply_rope, attention_weights, causal_mask,
                                    register_attention, rope_angles)
from moejax.models.blocks import Block, Encoder
from moejax.models.build import (ParamCounts, build_model, count_params, expert_params, map_moe_specs, model_config,
                                 param_counts, with_router_fields)
from moejax.models.config import FFNSpec, LMConfig, MLPConfig, ModelConfig, TransformerConfig, ViTConfig
from moejax.models.mlp import MLPClassifier
from moejax.models.transformer import TransformerLM, make_cache
from moejax.models.vit import ViTClassifier, patchify

__all__ = ["map_moe_specs", "with_router_fields", "Block", "Encoder", "FFNSpec", "KVCache", "LMConfig", "MHA", "MLA", "MLPClassifier", "MLPConfig", "ModelConfig", "ParamCounts",
           "SelfAttention", "TransformerConfig", "TransformerLM", "ViTClassifier", "ViTConfig", "apply_rope",
           "attention_weights", "build_model", "causal_mask", "count_params", "expert_params", "make_cache",
           "model_config", "param_counts", "patchify", "register_attention", "rope_angles"]
