"""The safetensors files of a Hugging Face directory: lazy reading, and writing with shards and an index.

Reading goes through ``safetensors.safe_open(..., framework="numpy")``: files are memory-mapped and a slice of a
tensor reads only that slice's bytes, so a model larger than memory can be placed shard by shard.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
DEFAULT_SHARD_BYTES = 5 * 2**30   # what transformers' save_pretrained uses ("5GB")


class CheckpointFiles:
    """The tensors of a directory's ``*.safetensors`` (one file, or the shards its ``model.safetensors.index.json``
    names).

    Use as a context manager (closes the memory maps). ``names`` lists every tensor in the files; ``read(name,
    box)`` returns the box (a tuple of slices) of one tensor as a numpy array in its stored dtype.
    """

    def __init__(self, path: str):
        self.path = path
        self._stack = contextlib.ExitStack()
        self._handles = {}
        self._where: dict[str, str] = {}
        try:
            self._open(path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: str) -> None:
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
        if not files:
            raise ValueError(f"{path}: no *.safetensors files (nor {INDEX})")
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise ValueError(f"{full}: listed in {INDEX} but missing")
            handle = self._stack.enter_context(_open_file(full))
            self._handles[fname] = handle
            for name in handle.keys():
                self._where.setdefault(name, fname)
        self._names = frozenset(self._where)
        for name, fname in (weight_map or {}).items():
            if self._where.get(name) != fname:
                raise ValueError(f"{name}: {INDEX} puts it in {fname}, which does not hold it")

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def names(self) -> frozenset[str]:
        """Every tensor name in the files."""
        return self._names

    def file_of(self, name: str) -> str:
        return self._where[name]

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it (``F32``, ``BF16``, ...)."""
        return self._slice(name).get_dtype()

    def read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._slice(name)[box])


def _weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` of an index file; a one-line error naming the file when it is not a valid index."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:    # json's errors are ValueErrors without the file name
        raise ValueError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e}); re-download or "
                         f"re-export it") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to file names; re-download or re-export it")
    return weight_map


def _open_file(full: str) -> Any:
    """``safe_open(full)``; a truncated or corrupt file (the Rust library's error names no file) is a one-line
    ValueError naming it."""
    try:
        return safe_open(full, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{full}: not a readable safetensors file ({_damage(full, e)}); re-download or re-export "
                         f"it") from e


def _damage(full: str, error: BaseException) -> str:
    """What is wrong with a file safetensors refused: its size against the size its header describes when that
    shows a truncation (the usual cause: an interrupted download or copy), else the library's own message."""
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        size = os.path.getsize(full)
        with open(full, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated: {size} bytes, shorter than the 8-byte header length; {said}"
            n = int.from_bytes(head, "little")
            if size < 8 + n:
                return f"truncated: {size} bytes, its header alone claims {8 + n}; {said}"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return said         # not even a readable header: the library's message is all there is
    if size < 8 + n + end:
        return f"truncated: {size} of the {8 + n + end} bytes its header describes"
    return said


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names (in order) grouped into files of at most ``max_bytes`` (a bigger tensor gets a file alone)."""
    files: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def write_checkpoint(path: str, tensors: list[tuple[str, int, Callable[[], np.ndarray]]],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Writes ``(name, nbytes, make)`` tensors as ``model.safetensors`` or, above ``max_shard_bytes``, as
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. Each tensor is made (e.g.
    fetched from devices) only while its file is written. Returns the file names."""
    os.makedirs(path, exist_ok=True)
    sizes = [(name, nbytes) for name, nbytes, _ in tensors]
    makers = {name: make for name, _, make in tensors}
    groups = plan_shards(sizes, max_shard_bytes)
    names = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                               for i in range(len(groups))]
    for fname, group in zip(names, groups):
        save_file({name: makers[name]() for name in group}, os.path.join(path, fname), metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(s for _, s in sizes)},
                 "weight_map": {name: fname for fname, group in zip(names, groups) for name in sorted(group)}}
        with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return names


def existing_weights(path: str) -> list[str]:
    """The safetensors files and index already in ``path`` (sorted; empty when none or no directory)."""
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors") or f == INDEX)
