"""Perplexity of a language model over a token stream, and which experts every token used, layer by layer.

The stream is cut into non-overlapping windows of ``L + 1`` tokens (each window predicts its last ``L``); the
tail shorter than a window is dropped. Expert usage comes from the ``routing`` collection that token-choice MoE
layers record (:class:`~moejax.layers.MoELayer`), so it is exactly what the forward pass routed.

Shapes: ``N`` windows, ``L`` window length, ``K`` experts per token, ``E`` experts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.generation.decode import for_decoding
from moejax.models.config import LMConfig
from moejax.models.transformer import TransformerLM


@dataclasses.dataclass(frozen=True)
class LMEvaluation:
    """nll: mean negative log-likelihood per predicted token (nats); perplexity: ``exp(nll)``; tokens: predicted
    tokens; windows: int32[N, L + 1] the evaluated windows; expert_index: per MoE layer (by parameter path) int32[N, L,
    K] the experts each input token used (-1: empty slot); expert_frequency: per layer float[E] fraction of routed
    token copies per expert."""

    nll: float
    perplexity: float
    tokens: int
    windows: np.ndarray
    expert_index: dict[str, np.ndarray]
    expert_frequency: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        return {"nll": self.nll, "perplexity": self.perplexity, "tokens": self.tokens,
                "windows": int(self.windows.shape[0]), "window_length": int(self.windows.shape[1] - 1),
                "expert_frequency": self.expert_frequency}


def windows(stream: Sequence[int], length: int, max_windows: int | None = None) -> np.ndarray:
    """int32[N, L + 1] non-overlapping windows of ``stream``; an error naming ``length`` when none fits."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r}: must be an integer >= 1")
    stream = np.asarray(stream, np.int32)
    n = len(stream) // (length + 1)
    if n == 0:
        raise ValueError(f"length={length}: the text has {len(stream)} tokens, fewer than one window of "
                         f"{length + 1}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * (length + 1)].reshape(n, length + 1)


def routing_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'decoder/block_1/ffn': {'expert_index': (...,), ...}}``: the layers that recorded routing in a nested
    ``routing`` collection, by parameter path."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and "expert_index" in value:
            out[path] = value
        elif isinstance(value, Mapping):
            out.update(routing_paths(value, path))
    return out


def evaluate_lm(cfg: LMConfig, variables: Any, token_windows: np.ndarray, *, batch_size: int = 8) -> LMEvaluation:
    """Perplexity and per-token expert usage of the LM over ``token_windows`` int[N, L + 1] (dropless routing)."""
    cfg = for_decoding(cfg)
    model = TransformerLM(cfg)
    variables = {k: v for k, v in variables.items() if k != "routing"}
    collections = [k for k in variables if k != "params"] + ["routing"]

    @jax.jit
    def forward(batch):
        (logits, _), state = model.apply(variables, batch[:, :-1], mutable=collections)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0].sum()
        layers = {p: v["expert_index"][0] for p, v in routing_paths(state.get("routing", {})).items()}
        return nll, layers

    total, used = 0.0, {}
    for start in range(0, len(token_windows), batch_size):
        nll, layers = forward(jnp.asarray(token_windows[start:start + batch_size]))
        total += float(nll)
        for path, idx in layers.items():
            used.setdefault(path, []).append(np.asarray(idx))
    expert_index = {p: np.concatenate(v) for p, v in used.items()}
    freq = {}
    for path, idx in expert_index.items():
        spec = cfg.moe
        counts = np.bincount(idx[idx >= 0].ravel(), minlength=spec.num_routed if spec else 0)
        freq[path] = (counts / max(counts.sum(), 1)).round(6).tolist()
    n_tokens = int(token_windows.shape[0] * (token_windows.shape[1] - 1))
    nll = total / n_tokens
    return LMEvaluation(nll=nll, perplexity=math.exp(nll), tokens=n_tokens, windows=np.asarray(token_windows),
                        expert_index=expert_index, expert_frequency=freq)
