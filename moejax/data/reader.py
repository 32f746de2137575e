"""One reader for shipped and named TFDS datasets: :func:`load_split` returns a random-access source.

Shipped builders (:data:`SHIPPED_NAMES`) are prepared on demand, without network, under a file
lock; any other name goes to ``tfds.data_source(..., download=True)``, the same API, for machines
that can download. Data directories, in order of precedence: the ``data_dir`` argument,
``$MOEJAX_DATA_DIR``, then ``~/.cache/moejax/tfds`` for shipped builders and TFDS's own default
(``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) for named datasets, so existing downloads are reused.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moejax.data.builders import SHIPPED_BUILDERS

try:
    import fcntl
except ImportError:  # not on Windows; there, rely on the FileExistsError fallback in prepare()
    fcntl = None

SHIPPED_NAMES: tuple[str, ...] = tuple(sorted(SHIPPED_BUILDERS))
SHORT_NAMES: dict[str, str] = {n.removeprefix("moejax_"): n for n in SHIPPED_NAMES}
Example = dict[str, Any]


class RandomAccessSource(Protocol):
    """What batchers read: ``len(source)`` examples, ``source[i]`` a dict of NumPy values."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def resolve_name(name: str) -> str:
    """Maps a short name (``digits``) to its builder (``moejax_digits``); other names are unchanged."""
    return SHORT_NAMES.get(name, name)


def is_shipped(name: str) -> bool:
    """True when ``name`` (short or full) is one of the builders moejax ships."""
    return resolve_name(name) in SHIPPED_BUILDERS


def default_data_dir() -> str:
    """``$MOEJAX_DATA_DIR`` if set, else ``~/.cache/moejax/tfds``: where shipped builders are prepared."""
    return os.environ.get("MOEJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "moejax", "tfds")


def not_a_directory(path: str) -> str | None:
    """Why ``path`` cannot be used as a data directory, or None when it can: it, or the nearest of its parents
    that exists, is something other than a directory (a missing directory is fine: it is created)."""
    if "://" in path:        # a URL TFDS reads (gs://...): nothing to check on this machine
        return None
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isdir(probe):
        return None
    kind = "a file" if os.path.isfile(probe) else "not a directory"
    if probe == os.path.abspath(path):
        return "is a file, not a directory" if kind == "a file" else "exists and is not a directory"
    return f"{probe} is {kind}, so the directory cannot be created"


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing); blocks until it is free."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds a shipped dataset into ``data_dir`` unless it is already there; returns its builder.

    Idempotent and safe when several processes race: preparation runs under a lock file
    ``<data_dir>/.<builder>.lock``; a process that waited finds the data and only reads it. Where
    locks do not work (some network filesystems), TFDS still builds into ``incomplete.*`` and
    renames; losing that rename is treated as success because the winner wrote the same content.
    """
    full = resolve_name(name)
    if full not in SHIPPED_BUILDERS:
        raise ValueError(f"name={name!r}: not a shipped dataset; shipped: {_shipped_list()}")
    data_dir = data_dir or default_data_dir()
    cls = SHIPPED_BUILDERS[full]
    with _file_lock(os.path.join(data_dir, f".{full}.lock")):
        builder = cls(data_dir=data_dir, file_format="array_record")
        try:
            builder.download_and_prepare()
        except FileExistsError:
            builder = cls(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise
    return builder


class Source:
    """A TFDS split as a random-access source of NumPy examples.

    ``source[i]`` is a dict: tensors as ``np.ndarray``, class labels and other scalars as 0-d
    arrays, text as ``bytes`` (TFDS does not decode it). ``info`` is the ``tfds.core.DatasetInfo``
    (``None`` if the underlying source has none).
    """

    def __init__(self, data_source: Any, info: Any, name: str, split: str):
        self._ds = data_source
        self.info = info
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> Example:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name}[{self.split}] of length {n}")
        return _to_numpy(self._ds[index % n])

    def __getitems__(self, indices: Sequence[int]) -> list[Example]:
        indices = [int(i) for i in indices]
        if hasattr(self._ds, "__getitems__"):
            return [_to_numpy(e) for e in self._ds.__getitems__(indices)]
        return [_to_numpy(self._ds[i]) for i in indices]

    def __repr__(self) -> str:
        return f"Source({self.name!r}, split={self.split!r}, len={len(self)})"


def _to_numpy(example: Mapping[str, Any]) -> Example:
    return {k: v if isinstance(v, (bytes, np.ndarray)) else
            v.encode("utf-8") if isinstance(v, str) else np.asarray(v) for k, v in example.items()}


class ArraySource:
    """An in-memory source over equal-length columns ``{key: array[N, ...]}`` (fast gathers).

    Batchers use :meth:`gather` (one fancy index per column) when a source has it.
    """

    def __init__(self, columns: Mapping[str, np.ndarray], info: Any = None):
        lengths = {k: len(v) for k, v in columns.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"columns: need at least one column, all of equal length; got {lengths}")
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        self.info = info
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Example:
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for length {self._n}")
        return {k: v[index] for k, v in self.columns.items()}

    def gather(self, indices: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """``{key: column[indices]}`` for ``indices int64[b]``."""
        return {k: self.columns[k][indices] for k in keys}


def materialize(source: RandomAccessSource, keys: Sequence[str], chunk: int = 4096) -> ArraySource:
    """Reads the array features ``keys`` of every example into memory (in order, in chunks)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(source), chunk):
        idx = range(start, min(start + chunk, len(source)))
        exs = source.__getitems__(list(idx)) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        for k in keys:
            cols[k].append(np.stack([np.asarray(e[k]) for e in exs]))
    return ArraySource({k: np.concatenate(v) for k, v in cols.items()}, info=getattr(source, "info", None))


def _shipped_list() -> str:
    return ", ".join(f"{short} ({full})" for short, full in SHORT_NAMES.items())


def load_split(name: str, split: str, data_dir: str | None = None) -> Source:
    """Random-access source of one split of a shipped or TFDS dataset.

    Args:
      name: a shipped builder, short (``digits``, ``mnist1d``, ``stdlib_bytes``,
        ``synthetic_clusters``, ``translated_digits``) or full (``moejax_digits``); or any TFDS
        name (``mnist``, ``cifar10``, ``tiny_shakespeare``, ``lm1b``, ``emnist/balanced``, ...),
        which TFDS downloads and prepares if needed.
      split: a TFDS split string (``train``, ``test``, ``train[:90%]``, ...).
      data_dir: see the module docstring for the default.

    Raises:
      ValueError: naming ``data.name`` for a name neither shipped nor known to TFDS, ``split``
        for a split the dataset does not have, or ``data_dir`` (``$MOEJAX_DATA_DIR``) when it is a file.
    """
    full = resolve_name(name)
    field = "data_dir" if data_dir else "$MOEJAX_DATA_DIR"
    data_dir = data_dir or os.environ.get("MOEJAX_DATA_DIR") or None
    problem = data_dir and not_a_directory(data_dir)
    if problem:
        raise ValueError(f"{field}={data_dir!r}: {problem}; give a directory (created if missing)")
    if full in SHIPPED_BUILDERS:
        builder = prepare(full, data_dir)
        try:
            ds = builder.as_data_source(split=split)
        except (ValueError, KeyError) as e:
            raise ValueError(f"split={split!r}: not a split of {full}; available: "
                             f"{sorted(builder.info.splits)} ({e})") from e
        return Source(ds, builder.info, full, split)
    tfds_dir = data_dir or tfds.core.constants.DATA_DIR
    lock_name = "." + full.replace("/", "__").replace(":", "_") + ".lock"
    try:
        with _file_lock(os.path.join(tfds_dir, lock_name)):
            ds = tfds.data_source(full, split=split, data_dir=tfds_dir, download=True)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"data.name={name!r}: neither a shipped dataset ({_shipped_list()}) nor a "
                         f"dataset TFDS knows (some TFDS datasets also need TensorFlow installed); "
                         f"TFDS said: {str(e).splitlines()[0]}") from e
    except Exception as e:
        kind = ValueError if isinstance(e, ValueError) else RuntimeError
        raise kind(f"data.name={name!r}: tfds.data_source failed for split {split!r} "
                   f"(data_dir={tfds_dir}): {type(e).__name__}: {e}") from e
    return Source(ds, getattr(ds, "dataset_info", None), full, split)
