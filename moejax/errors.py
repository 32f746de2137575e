"""One wording for config errors that every section shares."""
from __future__ import annotations

import difflib
from typing import Iterable


def unknown_field(field: str, known: Iterable[str], owner: str = "") -> ValueError:
    """``<field>: unknown field[ of <owner>] (did you mean 'x'?); known fields: [...]``; ``field`` is the full dotted
    path (``data.batchsize``), the suggestion the closest names to its last part."""
    names = sorted(known)
    close = difflib.get_close_matches(field.rsplit(".", 1)[-1], names, n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return ValueError(f"{field}: unknown field{' of ' + owner if owner else ''}{hint}; known fields: {names}")
