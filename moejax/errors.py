"""One wording for config errors that every section shares."""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'a', 'b'?)`` for the names closest to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, sorted(names), n=3)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def unknown_field(field: str, known: Iterable[str], owner: str = "") -> ValueError:
    """``<field>: unknown field[ of <owner>] (did you mean 'x'?); known fields: [...]``; ``field`` is the full dotted
    path (``data.batchsize``), the suggestion the closest names to its last part."""
    names = sorted(known)
    hint = closest(field.rsplit(".", 1)[-1], names)
    return ValueError(f"{field}: unknown field{' of ' + owner if owner else ''}{hint}; known fields: {names}")
