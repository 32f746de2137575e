"""Byte-level language modelling: a split as one token stream, random windows, eval windows.

Tokens are bytes (vocabulary 256). Documents are concatenated in split order with a separator
byte between them (0 by default: it does not occur in text, so it marks document boundaries).
The whole stream is held in memory (``uint8``): fine for the stdlib corpus (~12 MB) and
tiny_shakespeare (~1 MB); for large corpora such as lm1b pass ``max_bytes`` to read only a prefix.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from moejax.data.batching import check_process_split, hash_key, hash_stream

VOCAB_SIZE = 256


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    arr = np.asarray(value)
    if arr.dtype == np.uint8:
        return arr.tobytes()
    if arr.dtype.kind in ("S", "O", "U") and arr.ndim == 0:
        return _as_bytes(arr.item())
    raise TypeError(f"text feature: expected bytes, str or uint8[...], got {arr.dtype}{list(arr.shape)}")


def byte_stream(source: Any, text_key: str = "text", separator: int | None = 0,
                max_bytes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Concatenates the ``text_key`` feature of every example of ``source``, in order.

    Args:
      source: a random-access source (``len``, ``[i]``; ``__getitems__`` is used when present).
      separator: byte inserted between documents; ``None`` for none.
      max_bytes: stop reading once the stream has this many bytes, and truncate to it.

    Returns:
      ``uint8[N]``.
    """
    sep = b"" if separator is None else bytes([separator])
    pieces: list[bytes] = []
    total = 0
    for start in range(0, len(source), chunk):
        idx = list(range(start, min(start + chunk, len(source))))
        exs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        for ex in exs:
            if pieces and sep:
                pieces.append(sep)
                total += len(sep)
            doc = _as_bytes(ex[text_key])
            pieces.append(doc)
            total += len(doc)
            if max_bytes is not None and total >= max_bytes:
                return np.frombuffer(b"".join(pieces)[:max_bytes], np.uint8).copy()
    return np.frombuffer(b"".join(pieces), np.uint8).copy()


def _check_stream(stream: np.ndarray, seq_len: int, min_len: int) -> np.ndarray:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len!r}: must be an integer >= 1")
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise ValueError(f"stream: must be 1-D, got shape {stream.shape}")
    if len(stream) < min_len:
        raise ValueError(f"data.seq_len={seq_len}: needs a stream of at least {min_len} tokens, "
                         f"the stream has only {len(stream)}")
    return stream


class LMBatches:
    """Training windows ``{"tokens": int32[b, seq_len + 1]}`` at pseudo-random offsets.

    Row ``r`` of global batch ``step`` starts at ``hash(seed, step, r) mod (N - seq_len)``, so every
    window lies inside the stream and ``batch(step)`` depends on ``(seed, step)`` only. Inputs are
    ``tokens[:, :-1]``, targets ``tokens[:, 1:]``. With ``process_count > 1`` this process gets rows
    ``[p * B / P, (p + 1) * B / P)`` of the global batch.
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        self.stream = _check_stream(stream, seq_len, seq_len + 1)
        self.local_batch_size = check_process_split("data.batch_size", batch_size, process_index, process_count)
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.process_index = int(process_index)

    def offsets(self, step: int) -> np.ndarray:
        """``int64[b]``: start of each of this process's windows in global batch ``step``."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        rows = np.arange(self.local_batch_size, dtype=np.int64) + self.process_index * self.local_batch_size
        h = hash_stream(hash_key(self.seed, int(step), 0x1A9), rows)
        return (h % np.uint64(len(self.stream) - self.seq_len)).astype(np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``step``."""
        idx = self.offsets(step)[:, None] + np.arange(self.seq_len + 1)
        return {"tokens": self.stream[idx].astype(np.int32)}


class LMEval:
    """Non-overlapping windows over the whole stream, padded into fixed-size batches.

    Window ``w`` holds tokens ``[w * seq_len, w * seq_len + seq_len]`` (``seq_len + 1`` of them, the
    last shared with the next window), so every token after the first is a target exactly once.
    Yields ``{"tokens": int32[b, seq_len + 1], "mask": float32[b, seq_len]}`` where ``mask[r, t]``
    is 1 when target ``tokens[r, t + 1]`` is real (not padding past the end of the stream or a
    padding window). Re-iterable.
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, process_index: int = 0,
                 process_count: int = 1):
        self.stream = _check_stream(stream, seq_len, 2)  # one target is enough; the last window is padded
        self.local_batch_size = check_process_split("data.eval_batch_size", batch_size, process_index, process_count)
        self.batch_size, self.seq_len, self.process_index = int(batch_size), int(seq_len), int(process_index)
        self.num_windows = math.ceil((len(self.stream) - 1) / self.seq_len)

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n, length = len(self.stream), self.seq_len
        for k in range(len(self)):
            first = k * self.batch_size + self.process_index * self.local_batch_size
            w = np.arange(first, first + self.local_batch_size, dtype=np.int64)
            real = (w < self.num_windows)[:, None]
            pos = (np.where(real[:, 0], w, 0) * length)[:, None] + np.arange(length + 1)
            tokens = np.where((pos < n) & real, self.stream[np.minimum(pos, n - 1)], 0).astype(np.int32)
            yield {"tokens": tokens, "mask": ((pos[:, 1:] < n) & real).astype(np.float32)}
