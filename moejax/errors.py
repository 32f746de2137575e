"""One wording for config errors that every section shares, and the one-line exit of the command lines."""
from __future__ import annotations

import difflib
from typing import Callable, Iterable, Sequence


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


def command_main(run: Callable[[Sequence[str]], object], argv: Sequence[str] | None, debug: bool = False) -> int:
    """Exit status of a command line ``run(argv)`` (default ``sys.argv[1:]``): 0, or 2 after printing a ValueError as
    one line ``error: ...`` on stderr (the project's rule for bad input: one line naming the field).

    ``debug``: let the ValueError propagate instead, so its traceback is shown (and a post-mortem debugger sees it);
    a command offers it as ``--debug``, like ``python -m moejax.main``."""
    import sys
    try:
        run(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        if debug:
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
