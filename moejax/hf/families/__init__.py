"""The built-in Hugging Face families; importing this package registers them (one file each)."""
from moejax.hf.families import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401
