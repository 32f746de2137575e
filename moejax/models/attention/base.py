"""The plug-in contract of attention: kinds registered by name, the per-call inputs, and the KV cache.

An **attention kind** is a frozen, self-validating dataclass registered with :func:`register_attention`; its fields
are that kind's own options (errors name ``attention.<field>``; the model config prefixes ``model.``) and its
:meth:`AttentionConfig.build` returns the Flax module. Every kind's module is called the same way::

    y, new_cache = attn(x, call, cache)     # x: [B, L, D] -> y: [B, L, D]

with an :class:`AttentionCall` (rotary positions of the L new tokens, which cache slots they occupy, which key
slots hold real tokens) and the layer's cache entries (a dict of arrays, ``None`` without a cache). A kind declares
what it caches in :meth:`AttentionConfig.cache_spec`, so a model's :class:`KVCache` is built without knowing the
kinds (multi-head latent attention caches its compressed latent, not keys and values). Models never branch on
the kind; an experiment registers its own kind by importing its file.

Shapes: ``B`` batch, ``L`` new tokens in this call, ``S`` key slots (``L`` without a cache, the cache length with
one), ``D`` width, ``H`` query heads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moejax.errors import unknown_field
from moejax.registry import Registry

ATTENTION_KINDS: Registry[type["AttentionConfig"]] = Registry("attention kind", "attention.kind",
                                                              name_of=lambda cls: cls.KIND)


def fail(field: str, value: Any, why: str) -> None:
    """Raises the config error ``attention.<field>=<value!r>: <why>``."""
    raise ValueError(f"attention.{field}={value!r}: {why}")


def check_int(field: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, value, f"must be an integer >= {minimum}" + (" or None" if allow_none else ""))


def register_attention(cls: type["AttentionConfig"]) -> type["AttentionConfig"]:
    """Class decorator: registers an attention kind under ``cls.KIND`` (a second class with the same name is an
    error, so two experiments cannot silently replace each other's kind)."""
    return ATTENTION_KINDS.add(cls)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Base of the attention kinds. Subclasses are frozen ``kw_only`` dataclasses with a ``KIND`` name."""

    KIND: ClassVar[str] = ""

    def check(self, *, d_model: int, num_heads: int, rotary: bool, prefix: str = "") -> None:
        """Cross-checks against the model (``d_model``, ``num_heads``, whether rotary positions are used); errors
        name fields as ``<prefix>num_heads`` / ``<prefix>attention.<field>``."""

    def build(self, *, d_model: int, num_heads: int, causal: bool, rope_base: Any, norm_eps: float,
              dtype: str, param_dtype: str, name: str) -> nn.Module:
        """The Flax module, called as ``attn(x, call, cache) -> (y, new_cache)``."""
        raise NotImplementedError

    def cache_spec(self, *, batch: int, length: int, d_model: int, num_heads: int,
                   dtype: jnp.dtype) -> dict[str, jax.ShapeDtypeStruct]:
        """The arrays one layer caches for ``length`` slots of ``batch`` sequences (each [B, S, ...])."""
        raise NotImplementedError

    def flops(self, *, d_model: int, num_heads: int, keys: float) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add) of one layer whose queries attend to ``keys`` keys
        on average (:mod:`moejax.training.flops`); kinds without a count raise ``NotImplementedError``."""
        raise NotImplementedError(f"attention kind {self.KIND!r} has no FLOPs count")

    def window(self) -> int | None:
        """The sliding-window length, if the kind has one."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


def attention_from_any(value: Any) -> AttentionConfig:
    """An attention config from an instance, or a mapping with ``kind`` (default ``mha``) and that kind's fields;
    unknown kinds and fields are one-line errors naming them."""
    if isinstance(value, AttentionConfig):
        return value
    if not hasattr(value, "items"):
        fail("", value, "must be an attention config or a mapping with 'kind' and its fields")
    d = dict(value.items())
    kind = d.pop("kind", "mha")
    cls = ATTENTION_KINDS.get(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise unknown_field(f"attention.{key}", names, f"attention kind {kind!r}")
    return cls(**d)


@struct.dataclass
class AttentionCall:
    """Per-call inputs every attention kind receives (built once per model call).

    Attributes:
      positions: int[B, L] rotary positions of the new tokens.
      key_valid: bool[B, S] key slot ``s`` of sequence ``b`` holds a real token (False: padding, or a cache slot
        not yet written).
      index: int32[] slot of the first new token (0 without a cache); the new tokens occupy ``[index, index + L)``.
    """

    positions: jax.Array
    key_valid: jax.Array
    index: jax.Array

    def mask(self, length: int, *, causal: bool, window: int | None = None) -> jax.Array:
        """bool[B, 1, L, S]: query ``q`` (slot ``index + q``) may attend to key slot ``s``.

        Causal: ``s <= index + q``; ``window`` (sliding-window attention): also ``index + q - s < window``, i.e.
        each query sees itself and the ``window - 1`` slots before it. Slots are consecutive per sequence (left
        padding shifts every token of a sequence alike), so slot differences are position differences.
        """
        num_slots = self.key_valid.shape[1]
        q_slot = self.index + jnp.arange(length)[:, None]          # [L, 1]
        k_slot = jnp.arange(num_slots)[None, :]                      # [1, S]
        allowed = jnp.ones((length, num_slots), bool)
        if causal:
            allowed &= k_slot <= q_slot
        if window is not None:
            allowed &= q_slot - k_slot < window
        return (allowed[None] & self.key_valid[:, None, :])[:, None]


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """cache [B, S, ...] with ``new`` [B, L, ...] written at slots ``[index, index + L)``."""
    start = (0, index) + (0,) * (cache.ndim - 2)
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis with False entries at zero weight (a row with no allowed key, e.g. a
    padding query, gets uniform weights instead of NaNs; its output is never used)."""
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@struct.dataclass
class KVCache:
    """The decoding state of a model: per block its attention kind's cached arrays, and the slot bookkeeping.

    Attributes:
      layers: one dict per block (``cache_spec`` of its attention kind; e.g. ``k``, ``v`` [B, S, Hkv, Dh]).
      index: int32[] slots ``[0, index)`` are written; the next call writes its ``L`` tokens at ``[index, index + L)``.
      valid: bool[B, S] slot holds a real token of that sequence (left padding and unwritten slots are False).
    """

    layers: tuple[dict[str, jax.Array], ...]
    index: jax.Array
    valid: jax.Array

    @property
    def length(self) -> int:
        """``S``, the number of slots."""
        return self.valid.shape[1]


def init_cache(specs: tuple[Mapping[str, jax.ShapeDtypeStruct], ...], batch: int, length: int) -> KVCache:
    """An empty cache (zeros, no valid slot) from one ``cache_spec`` per block."""
    layers = tuple({k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items()} for spec in specs)
    return KVCache(layers=layers, index=jnp.zeros((), jnp.int32), valid=jnp.zeros((batch, length), bool))
