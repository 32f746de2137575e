"""Batched generation with a KV cache: one prefill call over the left-padded prompts, then one call per new token.

Prompts of different lengths are left-padded to the longest, so every sequence's next token lands in the same
cache slot; each token's rotary position is its slot minus its sequence's padding, and padding slots are never
attended to. MoE layers route each call's tokens dropless (:func:`for_decoding`), so a token's output never depends
on the other sequences in the batch, and decoding equals full recomputation.

Shapes: ``B`` prompts, ``P`` longest prompt, ``N`` new tokens, ``V`` vocabulary.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import MoEConfig
from moejax.generation.contrast import SelfContrast
from moejax.generation.sampling import Sampling, next_token
from moejax.layers import LAYERS
from moejax.models.config import LMConfig
from moejax.models.transformer import TransformerLM, make_cache
from moejax.routing import plugin

log = logging.getLogger("moejax")


@dataclasses.dataclass(frozen=True)
class Generated:
    """tokens: int32[B, N] new tokens (after a stop token: ``pad_id``); lengths: int32[B] new tokens up to and
    including the stop token; prompt_lengths: int32[B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray

    def as_lists(self) -> list[list[int]]:
        return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


def for_decoding(cfg: LMConfig) -> LMConfig:
    """``cfg`` with every MoE FFN dispatching dropless (same parameters), after checking that each FFN computes
    every token on its own (a token-choice router in a token-wise layer); a one-line error names the field."""
    specs = {spec for spec in cfg.ffn_specs() if isinstance(spec, MoEConfig)}
    for spec in specs:
        if not getattr(LAYERS[spec.layer], "token_wise", False):
            raise ValueError(f"model.moe.layer={spec.layer!r}: mixes the tokens of a call, so decoding one token at "
                             f"a time differs from the full forward pass; generation needs a token-wise layer")
        if plugin.TOKEN_CHOICE not in spec.router.options.offers:
            raise ValueError(f"model.moe.router.kind={spec.router.kind!r}: experts choose among the tokens of a call, "
                             f"so decoding one token at a time differs from the full forward pass")
    if cfg.moe is None or cfg.moe.dispatch.mode == "dropless":
        return cfg
    # Routing groups belong to capacity buffers; dropless has none (and refuses a groups count it would ignore).
    dispatch = dataclasses.replace(cfg.moe.dispatch, mode="dropless", groups=1, group_size=None)
    moe = dataclasses.replace(cfg.moe, dispatch=dispatch)
    return dataclasses.replace(cfg, moe=moe)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int32[B, P] left-padded prompts, int32[B] their lengths); an empty prompt is an error naming its index."""
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt (give at least one token, e.g. a BOS token)")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, tokens.shape[1] - len(p):] = np.asarray(p, np.int32)
    return tokens, lengths


def fit_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int | None,
                truncate: bool = False) -> list[Sequence[int]]:
    """``prompts`` checked against a model's ``max_positions``: each prompt plus its ``max_new_tokens`` new tokens
    must fit (the rotary positions it reaches and its KV cache slots). A prompt that does not is a one-line error
    naming its index, its length and the limit; with ``truncate`` it is cut to its last ``max_positions -
    max_new_tokens`` tokens instead (the end of a prompt is what the continuation follows), with a warning saying
    how many tokens were cut. ``max_positions`` None: the model states no limit, nothing to check."""
    if max_positions is None:
        return list(prompts)
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions={max_positions!r}: must be an integer >= 1, or None for no limit")
    room = max_positions - max_new_tokens                  # prompt tokens that fit next to the new ones
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: leaves no room for a prompt in the model's "
                         f"{max_positions} positions; must be <= {max_positions - 1}")
    fitted = []
    for i, p in enumerate(prompts):
        n = len(p)
        if n <= room:
            fitted.append(p)
            continue
        if not truncate:
            fewer = f" or lower max_new_tokens to {max_positions - n}" if n < max_positions else ""
            raise ValueError(f"prompts[{i}]: {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens}, "
                             f"more than the model's {max_positions} positions; shorten it to {room} tokens{fewer}, "
                             f"or pass truncate_prompts=True (--truncate_prompts) to keep its last {room}")
        log.warning("prompts[%d]: cut %d of its %d tokens (kept the last %d) to fit the model's %d positions with "
                    "max_new_tokens=%d", i, n - room, n, room, max_positions, max_new_tokens)
        fitted.append(list(p)[n - room:])
    return fitted


def generate(cfg: LMConfig, variables: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_token: int | None = None, pad_id: int = 0,
             rng: jax.Array | None = None, cache_dtype: str | None = None,
             contrast: SelfContrast | None = None, max_positions: int | None = None,
             truncate_prompts: bool = False) -> Generated:
    """Generates up to ``max_new_tokens`` tokens after each prompt (a list of token-id lists).

    ``variables``: the model's variables (``{'params': ..., **moe_state}``). ``stop_token``: a sequence ends after
    emitting it (later positions hold ``pad_id``). ``rng``: required unless greedy. One prefill call over the left-
    padded prompts, then ``max_new_tokens - 1`` single-token calls in one compiled loop. ``contrast``: self-contrast
    decoding (:class:`~moejax.generation.contrast.SelfContrast`): the same model run a second time with weaker
    expert activation (its own KV cache), the next token chosen from the contrast of the two. ``max_positions``: the
    positions the model handles (e.g. :attr:`~moejax.generation.sources.LanguageModel.max_positions`; None: no
    limit); a prompt that does not fit with ``max_new_tokens`` is an error, or with ``truncate_prompts`` keeps its
    last tokens that fit (:func:`fit_prompts`; ``prompt_lengths`` are then the kept lengths).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not sampling.greedy and rng is None:
        raise ValueError(f"rng: sampling with temperature={sampling.temperature} needs a PRNG key")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    prompts = fit_prompts(prompts, max_new_tokens, max_positions, truncate_prompts)
    cfg = for_decoding(cfg)
    tokens, lengths = left_pad(prompts, pad_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out, n = _generate(cfg, variables, jnp.asarray(tokens), jnp.asarray(lengths), rng, max_new_tokens, sampling,
                       -1 if stop_token is None else int(stop_token), int(pad_id), cache_dtype, contrast)
    return Generated(np.asarray(out), np.asarray(n), lengths)


def cached_forward(cfg: LMConfig, collections: Sequence[str] = (), moe_k: int | None = None):
    """``call(variables, tokens int[B, L], positions int[B, L], mask bool[B, L], cache) -> (logits float32[B, L, V],
    cache)``: the model's cached forward call, the one both :func:`generate` and :mod:`moejax.aot` run.
    ``collections``: the variables' collections besides ``params`` (e.g. ``moe_state``: selection biases are read,
    never updated); ``moe_k``: experts per token of every routed layer for this view of the model (None: each
    layer's own)."""
    model = TransformerLM(cfg)
    mutable = [k for k in collections if k != "params"]

    def call(variables, tokens, positions, mask, cache):
        res = model.apply(variables, tokens, positions=positions, token_mask=mask, cache=cache, moe_k=moe_k,
                          mutable=mutable or False)
        logits, _, cache = res[0] if mutable else res
        return logits, cache

    return call


def decode_fn(cfg: LMConfig, variables: Any, moe_k: int | None = None):
    """``step(tokens int[B, L], positions int[B, L], mask bool[B, L], cache) -> (logits float32[B, L, V], cache)``:
    :func:`cached_forward` with ``variables`` bound."""
    call = cached_forward(cfg, tuple(variables), moe_k)
    return lambda tokens, positions, mask, cache: call(variables, tokens, positions, mask, cache)


@jax.jit(static_argnames=("cfg", "max_new", "sampling", "stop", "pad", "cache_dtype", "contrast"))
def _generate(cfg: LMConfig, variables: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, max_new: int,
              sampling: Sampling, stop: int, pad: int, cache_dtype: str | None,
              contrast: SelfContrast | None) -> tuple[jax.Array, jax.Array]:
    b, p = tokens.shape
    views = [decode_fn(cfg, variables)] + ([] if contrast is None else [decode_fn(cfg, variables, contrast.weak_k)])

    def step(tokens, positions, mask, caches):
        outs = [view(tokens, positions, mask, c) for view, c in zip(views, caches)]
        logits = [o[0] for o in outs]
        combined = logits[0] if contrast is None else contrast.combine(*logits)
        return combined, tuple(o[1] for o in outs)

    padding = p - lengths                                                          # [B]
    slots = jnp.arange(p)[None]
    positions = jnp.maximum(slots - padding[:, None], 0)
    mask = slots >= padding[:, None]
    cache = tuple(make_cache(cfg, b, p + max_new, cache_dtype) for _ in views)
    logits, cache = step(tokens, positions, mask, cache)
    rng, key = jax.random.split(rng)
    first = next_token(logits[:, -1], key, sampling)
    done = first == stop

    def body(carry, _):
        token, pos, done, cache, rng = carry
        logits, cache = step(token[:, None], pos[:, None], jnp.ones((b, 1), bool), cache)
        rng, key = jax.random.split(rng)
        new = jnp.where(done, pad, next_token(logits[:, 0], key, sampling))
        return (new, pos + 1, done | (new == stop), cache, rng), new

    carry = (first, lengths, done, cache, rng)
    _, rest = jax.lax.scan(body, carry, None, length=max_new - 1)
    out = jnp.concatenate([first[:, None], rest.T], axis=1)                       # [B, N]
    is_stop = out == stop
    after = jnp.cumsum(is_stop, axis=1) - is_stop > 0                             # strictly after the first stop
    n = jnp.where(is_stop.any(axis=1), jnp.argmax(is_stop, axis=1) + 1, max_new).astype(jnp.int32)
    return jnp.where(after, pad, out), n
