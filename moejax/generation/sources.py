"""Where a language model comes from: a Hugging Face directory or a moejax training workdir, and its tokenizer.

Both give a :class:`LanguageModel` (typed config, variables, tokenizer), so generation and evaluation never care
which it was. A Hugging Face directory is recognised by the ``model_type`` in its ``config.json``; a workdir by the
experiment config the trainer writes there (``config.json`` with a ``model`` section) and its checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Protocol, Sequence


from moejax.models.config import LMConfig


class Tokenizer(Protocol):
    """Text <-> token ids."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """The project's own LMs' tokenizer: UTF-8 bytes are the tokens (vocabulary 256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package (special tokens such as BOS are added the way the
    file's post-processor says)."""

    def __init__(self, path: str | pathlib.Path):
        from tokenizers import Tokenizer as _Tokenizer
        self.path = pathlib.Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """config: the typed LM config; variables: ``{'params': ..., **non-gradient collections}``; tokenizer;
    stop_token: the end-of-sequence id when the source names one; source: the path it came from; max_positions: the
    positions (prompt + new tokens) the source says the model handles (a Hugging Face ``max_position_embeddings``),
    None when it states none (rotary positions have no built-in limit; a moejax workdir records none)."""

    config: LMConfig
    variables: Any
    tokenizer: Tokenizer
    stop_token: int | None
    source: str
    max_positions: int | None = None


def _json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e


def load_language_model(path: str | pathlib.Path, *, dtype: str | None = None, mesh: Any = None) -> LanguageModel:
    """The LM in ``path``: a Hugging Face directory (``config.json`` with ``model_type``; :func:`moejax.hf.load`) or
    a moejax workdir (its newest checkpoint; the byte tokenizer). One-line errors name the path."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model: {path} has no config.json (expected a Hugging Face directory or a moejax workdir)")
    meta = _json(config_file)
    if "model_type" in meta:
        return _from_hf(path, meta, dtype, mesh)
    if "model" in meta:
        return _from_workdir(path, meta)
    raise ValueError(f"model: {config_file} has neither 'model_type' (Hugging Face) nor 'model' (moejax workdir)")


def _from_hf(path: pathlib.Path, meta: dict[str, Any], dtype: str | None, mesh: Any) -> LanguageModel:
    from moejax import hf
    loaded = hf.load(path, mesh=mesh, dtype=dtype)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"model: {path} has no tokenizer.json (needed to encode prompts and decode the output)")
    eos = meta.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return LanguageModel(loaded.config, loaded.variables, HFTokenizer(tok_file), eos, str(path),
                         _max_positions(meta))


def _max_positions(meta: dict[str, Any]) -> int | None:
    """The ``max_position_embeddings`` of a Hugging Face ``config.json``, or None when it has no usable one (then
    nothing is checked: the rotary positions of these families have no hard limit of their own)."""
    limit = meta.get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1 else None


def _from_workdir(path: pathlib.Path, meta: dict[str, Any]) -> LanguageModel:
    from moejax.models.build import model_config, sizes_from_params
    from moejax.training.checkpoint import read_checkpoint
    if meta["model"].get("kind") != "transformer_lm":
        raise ValueError(f"model: {path} holds a {meta['model'].get('kind')!r} model; generation needs a "
                         f"transformer_lm")
    raw, _ = read_checkpoint(path)
    cfg = model_config(dict(meta["model"]), **sizes_from_params(meta, raw["params"]))
    variables = {"params": raw["params"], **(raw.get("moe_state") or {})}
    return LanguageModel(cfg, variables, ByteTokenizer(), None, str(path))
