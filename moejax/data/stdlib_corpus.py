"""The byte-level corpus of the Python standard library's ``.py`` sources on this machine.

Content depends on the Python build (version and distribution patches), so the builder config is
named after the interpreter version and the description records ``sys.version``; a SHA-256 of all
(path, content) pairs is kept in the dataset's metadata to compare corpora across machines.

Excluded, so that the corpus is ordinary, deterministic library code: installed packages
(``site-packages``, ``dist-packages``), test suites (any directory named ``test``, ``tests`` or
``idle_test``, which also hold deliberately malformed files), the build-specific ``config-*``
directory and ``_sysconfigdata*`` modules (they embed the paths and flags of the build machine).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import Iterator

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VALIDATION_PERCENT = 5


def stdlib_root() -> pathlib.Path:
    """The directory of the pure-Python standard library (``sysconfig.get_paths()["stdlib"]``)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def python_tag() -> str:
    """``py<major>.<minor>.<micro>``, the builder config name: the corpus differs between versions."""
    v = sys.version_info
    return f"py{v.major}.{v.minor}.{v.micro}"


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("config-")


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
    """Relative POSIX paths of the included ``.py`` files under ``root``, sorted (code-point order)."""
    root = stdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here keeps the walk out of site-packages, which can dwarf the stdlib itself.
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(found)


def split_of(rel_path: str) -> str:
    """``"validation"`` for about ``VALIDATION_PERCENT``% of files, chosen by a hash of the path, else ``"train"``.

    Splitting by file (not by byte range) keeps every file, and its near-duplicates in later
    versions, on one side.
    """
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def iter_split(split: str, root: pathlib.Path | None = None) -> Iterator[tuple[str, bytes]]:
    """``(relative path, raw bytes)`` of the files of ``split``, in sorted path order."""
    root = stdlib_root() if root is None else root
    for rel in stdlib_files(root):
        if split_of(rel) == split:
            yield rel, (root / rel).read_bytes()


def corpus_fingerprint(root: pathlib.Path | None = None) -> str:
    """SHA-256 over every included file's path and content, in sorted order."""
    root = stdlib_root() if root is None else root
    h = hashlib.sha256()
    for rel in stdlib_files(root):
        data = (root / rel).read_bytes()
        h.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()
