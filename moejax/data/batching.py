"""Deterministic classification batches: ``batch(step)`` is a pure function of ``(seed, step)``.

There is no iterator state to checkpoint: after a restart the trainer calls ``batch(step)`` at the
restored step and sees exactly the batches it would have seen.

The training order is an endless stream of epochs. Global example ``g = step * B + row`` (``B`` the
global batch size) is example ``perm(seed, epoch)[g % N]`` with ``epoch = g // N``, so each epoch
visits every example exactly once and a batch may straddle two epochs. The permutation sorts
``splitmix64`` hashes of the example indices keyed by ``(seed, epoch)``: unlike NumPy's
``Generator`` streams, whose output NumPy does not promise to keep across versions, this order is
fixed by the code here.

With ``process_count > 1`` each process computes only its contiguous slice of the global batch,
rows ``[p * B / P, (p + 1) * B / P)``.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Iterator, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on ``uint64[...]`` (a bijection with good avalanche); wraps mod 2^64."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hash_key(*values: int) -> int:
    """A 64-bit key from integers (any sign or size; taken mod 2^64), order-sensitive."""
    h = np.zeros(1, np.uint64)
    for v in values:
        h = _mix64(h ^ np.array([int(v) % (1 << 64)], np.uint64)) + _GOLDEN
    return int(h[0])


def hash_stream(key: int, counters: np.ndarray) -> np.ndarray:
    """``uint64[n]`` pseudo-random values for ``counters int64[n]`` under ``key`` (splitmix64)."""
    c = counters.astype(np.uint64) + np.uint64(1)
    return _mix64(np.uint64(key) + c * _GOLDEN)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """``int64[n]``: the order of examples in ``epoch`` for ``seed``."""
    return np.argsort(hash_stream(hash_key(seed, epoch, 0x5EED), np.arange(n)), kind="stable")


def check_process_split(field: str, batch_size: Any, process_index: int, process_count: int) -> int:
    """Validates a global batch size against the process layout; returns the per-process size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{field}={batch_size!r}: must be an integer >= 1")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}: must be an integer >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r}: must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"{field}={batch_size}: the global batch must be divisible by "
                         f"process_count={process_count}")
    return int(batch_size) // int(process_count)


def gather(source: Any, indices: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """``{key: array[len(indices), ...]}`` of the examples at ``indices`` of a random-access source."""
    if hasattr(source, "gather"):
        return source.gather(indices, keys)
    idx = [int(i) for i in indices]
    exs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
    return {k: np.stack([np.asarray(e[k]) for e in exs]) for k in keys}


def _to_inputs(x: np.ndarray, scale: float | None) -> np.ndarray:
    if scale is None:
        scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0  # raw TFDS images
    return (x.astype(np.float32) * np.float32(scale)) if scale != 1.0 else x.astype(np.float32)


class _Reader:
    """Shared conversion of gathered examples into ``inputs``/``labels``/extras."""

    def __init__(self, source: Any, input_key: str, label_key: str, extra_keys: Sequence[str],
                 input_scale: float | None):
        if len(source) < 1:
            raise ValueError("source: has no examples")
        self.source, self.input_key, self.label_key = source, input_key, label_key
        self.extra_keys, self.input_scale = tuple(extra_keys), input_scale

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        cols = gather(self.source, indices, (self.input_key, self.label_key, *self.extra_keys))
        out = {"inputs": _to_inputs(cols[self.input_key], self.input_scale),
               "labels": cols[self.label_key].astype(np.int32)}
        out.update({k: cols[k] for k in self.extra_keys})
        return out


class ClassificationBatches(_Reader):
    """Training batches ``{"inputs": float32[b, ...], "labels": int32[b], <extra_keys>: [b, ...]}``.

    ``b = batch_size // process_count`` rows: this process's slice of the global batch. Inputs
    stored as ``uint8`` are scaled to [0, 1] unless ``input_scale`` is given.
    """

    def __init__(self, source: Any, batch_size: int, seed: int = 0, input_key: str = "image",
                 label_key: str = "label", extra_keys: Sequence[str] = (), process_index: int = 0,
                 process_count: int = 1, input_scale: float | None = None):
        super().__init__(source, input_key, label_key, extra_keys, input_scale)
        self.local_batch_size = check_process_split("data.batch_size", batch_size, process_index, process_count)
        self.batch_size, self.seed, self.process_index = int(batch_size), int(seed), int(process_index)
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = epoch_permutation(len(self.source), self.seed, epoch)
            while len(self._perms) > 2:  # a batch spans at most two epochs unless B > N
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """``int64[b]``: source indices of this process's rows of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        n = len(self.source)
        start = int(step) * self.batch_size + self.process_index * self.local_batch_size
        g = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        epochs, pos = np.divmod(g, n)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel]]
        return out

    def epoch(self, step: int) -> float:
        """Fractional epoch at the start of global batch ``step``."""
        return step * self.batch_size / len(self.source)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``step``; depends on ``(seed, step)`` only."""
        return self.read(self.indices(step))


class ClassificationEval(_Reader):
    """The whole split in order, in padded fixed-size batches, for evaluation that compiles once.

    Iterating yields ``{"inputs": float32[b, ...], "labels": int32[b], "mask": float32[b], ...}``;
    padding rows (past the end of the split) are zeros with ``mask == 0``. Summed over all batches
    and processes, the mask counts every example exactly once. Re-iterable.
    """

    def __init__(self, source: Any, batch_size: int, input_key: str = "image", label_key: str = "label",
                 extra_keys: Sequence[str] = (), process_index: int = 0, process_count: int = 1,
                 input_scale: float | None = None):
        super().__init__(source, input_key, label_key, extra_keys, input_scale)
        self.local_batch_size = check_process_split("data.eval_batch_size", batch_size, process_index, process_count)
        self.batch_size, self.process_index = int(batch_size), int(process_index)

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n = len(self.source)
        for k in range(len(self)):
            start = k * self.batch_size + self.process_index * self.local_batch_size
            g = np.arange(start, start + self.local_batch_size, dtype=np.int64)
            valid = g < n
            out = self.read(np.where(valid, g, 0))  # padding rows read example 0, then are zeroed
            for key, v in out.items():
                v[~valid] = 0
            out["mask"] = valid.astype(np.float32)
            yield out
