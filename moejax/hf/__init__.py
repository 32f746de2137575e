"""Hugging Face checkpoints of pretrained MoE LMs: import (:func:`load`) and export (:func:`save`).

Five families, one registered file each in :mod:`moejax.hf.families` (keyed by ``config.json``'s ``model_type``):
``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``. Each maps its config onto a
:class:`~moejax.models.LMConfig` (every key mapped, declared irrelevant to inference, or refused by name) and its
tensors onto the moejax parameter tree (experts stacked ``[E, ...]``, ``[out, in]`` weights transposed, heads as
their own axis, DeepSeek's score-correction bias in ``moe_state``).

    model = moejax.hf.load("/ckpt/Mixtral-8x7B", mesh=mesh, dtype="bfloat16")
    logits, _ = TransformerLM(model.config).apply(model.variables, tokens)
    moejax.hf.save("/out", model.config, model.variables, hf_config=model.hf_config)

Adding a family: one file in ``moejax/hf/families/`` with a :class:`Family` subclass decorated with
:func:`register_family`, imported from ``moejax/hf/families/__init__.py`` (or from an experiment's own module).
"""
from moejax.hf.family import FAMILIES, Family, family_for, lm_config_from_hf, register_family
from moejax.hf.io import LoadedModel, hf_config_for, load, save
from moejax.hf.layout import TensorMap

__all__ = ["FAMILIES", "Family", "LoadedModel", "TensorMap", "family_for", "hf_config_for", "lm_config_from_hf",
           "load", "register_family", "save"]
