"""Pretrained MoE architectures at their real sizes, for ``python -m moejax.aot --hf=<name | config.json>``.

``moejax/aot/hf_architectures/<name>.json`` are the architecture fields of the models' ``config.json`` files as
published on the Hugging Face Hub (:data:`SOURCES`; DeepSeek-V3's FP8 ``quantization_config`` left out: moejax
compiles it in bf16). They are read by the same family code as :func:`moejax.hf.load`
(:func:`moejax.hf.lm_config_from_hf`), so what is compiled is the model ``moejax.hf.load`` would build; the parameter
counts they give match the published totals (checked in tests/test_aot.py). Only shapes are ever made: no weights
are read, nothing the size of the model is allocated.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from moejax.models.config import LMConfig
from moejax.models.transformer import TransformerLM

ARCHITECTURES_DIR = pathlib.Path(__file__).resolve().parent / "hf_architectures"
# Shipped name -> (Hub repository, total parameters as its model card states them).
SOURCES: dict[str, tuple[str, str]] = {
    "mixtral_8x7b": ("mistralai/Mixtral-8x7B-v0.1", "46.7B total, 12.9B active"),
    "olmoe_1b_7b": ("allenai/OLMoE-1B-7B-0924", "6.9B total, 1.3B active"),
    "qwen1_5_moe_a2_7b": ("Qwen/Qwen1.5-MoE-A2.7B", "14.3B total, 2.7B active"),
    "qwen2_57b_a14b": ("Qwen/Qwen2-57B-A14B", "57B total, 14B active"),
    "qwen3_30b_a3b": ("Qwen/Qwen3-30B-A3B", "30.5B total, 3.3B active"),
    "deepseek_v3": ("deepseek-ai/DeepSeek-V3", "671B total, 37B active (plus a 14B multi-token-prediction module)"),
}


def names() -> list[str]:
    """The shipped architecture names."""
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def hf_config(spec: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``spec``: a shipped name, a ``config.json`` path or a model directory; a one-line
    ``ValueError`` naming ``--hf`` otherwise."""
    shipped = ARCHITECTURES_DIR / f"{spec}.json"
    path = shipped if shipped.is_file() else pathlib.Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--hf={spec!r}: not a shipped architecture ({', '.join(names())}), a config.json or a "
                         f"directory holding one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--hf={spec!r}: {path} is not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--hf={spec!r}: {path} must hold a JSON object")
    return config


def lm_config(spec: str, *, dtype: str = "bfloat16", param_dtype: str = "bfloat16") -> LMConfig:
    """The moejax model of ``spec`` (its family's reading of the config), computing in ``dtype`` with parameters
    in ``param_dtype`` (the MoE layers too)."""
    from moejax.hf import lm_config_from_hf
    try:
        cfg = lm_config_from_hf(hf_config(spec))
    except ValueError as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(text if text.startswith("--hf=") else f"--hf={spec!r}: {text}") from None
    moe = None if cfg.moe is None else dataclasses.replace(cfg.moe, dtype=dtype, param_dtype=param_dtype)
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype, moe=moe)


def model(spec: str, *, dtype: str = "bfloat16", param_dtype: str = "bfloat16") -> TransformerLM:
    """``TransformerLM(lm_config(spec, ...))``."""
    return TransformerLM(lm_config(spec, dtype=dtype, param_dtype=param_dtype))


__all__ = ["ARCHITECTURES_DIR", "SOURCES", "hf_config", "lm_config", "model", "names"]
