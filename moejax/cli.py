"""Command-line overrides of a config: ``--config.<path>=<value>``, for every field, written out or not.

``ml_collections.config_flags`` only overrides fields that the config file wrote out, so a field left at its
typed default (``router.kind``, ``dispatch.gmm``, a transform's field, ...) could not be set from the command line.
:func:`split_overrides` takes the ``--config.*`` arguments out of ``argv`` before absl parses it, and
:func:`apply_overrides` applies them to the loaded config, creating fields that are missing. Whether a field
exists is then decided by the typed configs (``MoEConfig.from_dict``, the model and trainer configs), which reject
unknown names in one line with the closest valid ones.

A section that the config file leaves at None (a placeholder) is created by an override of a field inside it, so
a config file's None can be filled in from the command line. A section that an earlier override of the same command
line set to None is not: ``--config.model.moe=None --config.model.moe.router.k=2`` would otherwise build an MoE
from library defaults where the first override asked for none, so it is an error naming both.

Paths are dotted, with list indices: ``model.layers[0].router.kind``. Values are Python literals
(``2``, ``1e-3``, ``None``, ``(1, 2)``, ``'relu'``), ``true``/``false``, or else taken as a string; a value for a
field that holds a float, int or bool is converted to that type (``--config.optimizer.learning_rate=1`` is 1.0).
"""
from __future__ import annotations

import ast
import contextlib
import re
import sys
from typing import Any, Sequence

import ml_collections

_OVERRIDE = re.compile(r"^(?P<path>[A-Za-z_][\w.\[\]]*)(=(?P<value>.*))?$")     # after the ``--<flag>.`` prefix
_STEP = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


def split_overrides(argv: Sequence[str], flag: str = "config") -> tuple[list[str], list[tuple[str, str]]]:
    """``argv`` without its ``--<flag>.<path>=<value>`` arguments, and those as ``(path, value)`` in order.

    ``--<flag>.<path> <value>`` (value as the next argument) is accepted too.
    """
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    prefix = f"--{flag}."
    while i < len(args):
        arg = args[i]
        if not arg.startswith(prefix):
            rest.append(arg)
            i += 1
            continue
        m = _OVERRIDE.match(arg[len(prefix):])
        if m is None:
            raise ValueError(f"{arg}: not a valid override (expected --{flag}.<dotted.path>=<value>)")
        value = m.group("value")
        if value is None:
            if i + 1 >= len(args):
                raise ValueError(f"{arg}: missing value")
            value, i = args[i + 1], i + 1
        overrides.append((m.group("path"), value))
        i += 1
    return rest, overrides


def parse_value(text: str, current: Any = None) -> Any:
    """The Python value of ``text``, converted to the type of ``current`` where that is a float, int or bool."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        value: Any = lowered == "true"
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {text!r}")
    elif isinstance(current, (int, float)) and isinstance(value, bool):
        raise ValueError(f"must be a number, got {text!r}")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, int) and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(current, str) and not isinstance(value, str):
        value = text
    return value


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    pos = 0
    for m in _STEP.finditer(path):
        sep = path[pos:m.start()]
        if sep not in ("", "."):
            raise ValueError(f"{path}: not a valid path")
        steps.append(m.group(1) if m.group(1) else int(m.group(2)))
        pos = m.end()
    if pos != len(path) or not steps:
        raise ValueError(f"{path}: not a valid path")
    return steps


def _child(node: Any, step: str | int, path: str) -> Any:
    if isinstance(step, int):
        if not isinstance(node, (list, tuple)) or step >= len(node):
            raise ValueError(f"{path}: index {step} is out of range or not a list")
        return node[step]
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        if step not in node or node[step] is None:
            unlocked = node.unlocked() if isinstance(node, ml_collections.ConfigDict) else contextlib.nullcontext()
            with unlocked:
                node[step] = ml_collections.ConfigDict()
        return node[step]
    raise ValueError(f"{path}: {step!r} is inside a {type(node).__name__}, which has no fields")


def _set(node: Any, step: str | int, value: Any, path: str) -> None:
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            raise ValueError(f"{path}: index {step} is out of range or not a list")
        node[step] = value
        return
    if isinstance(node, ml_collections.ConfigDict):
        with node.unlocked():
            if step in node:
                # Replacing a value by one of another type (e.g. a sub-config by None) is what the user asked for.
                del node[step]
            node[step] = value
    elif isinstance(node, dict):
        node[step] = value
    else:
        raise ValueError(f"{path}: cannot set a field inside a {type(node).__name__}")


def _dotted(steps: Sequence[str | int]) -> str:
    """``['model', 'layers', 0, 'router']`` -> ``model.layers[0].router``."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def _check_not_nulled(nulled: dict[tuple[str | int, ...], str], steps: Sequence[str | int], node: Any, path: str,
                      text: str) -> None:
    """Refuses to step into the section ``steps`` when it is None because an earlier override set it so (its
    override text in ``nulled``): creating it would silently undo that override."""
    key = tuple(steps)
    if key not in nulled:
        return
    step = steps[-1]
    if isinstance(step, int):
        current = node[step] if isinstance(node, (list, tuple)) and step < len(node) else None
    else:
        current = node.get(step) if isinstance(node, (ml_collections.ConfigDict, dict)) else None
    if current is None:
        section = _dotted(steps)
        raise ValueError(f"{path}={text!r}: {section} is None (set by --config.{nulled[key]}); drop that override "
                         f"to set fields of {section}, or this one to leave it None")


def split_or_exit(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """:func:`split_overrides` for an entry point: a bad override is one line on stderr and exit status 2."""
    try:
        return split_overrides(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def apply_or_exit(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """:func:`apply_overrides` for an entry point: a bad override is one line on stderr and exit status 2."""
    try:
        apply_overrides(config, overrides)
    except ValueError as e:
        print(f"error: --config.{e}", file=sys.stderr)
        sys.exit(2)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """Applies ``(path, value text)`` overrides in order, creating missing fields (see the module doc).

    A field inside a section that an earlier override set to None is an error naming the path and that override;
    a section the config file left at None is created (a placeholder to fill in).
    """
    nulled: dict[tuple[str | int, ...], str] = {}       # sections set to None by an override: path -> its text
    for path, text in overrides:
        steps = _steps(path)
        node: Any = config
        for i, step in enumerate(steps[:-1]):
            _check_not_nulled(nulled, steps[:i + 1], node, path, text)
            node = _child(node, step, path)
        last = steps[-1]
        current = None
        if isinstance(last, str) and isinstance(node, (ml_collections.ConfigDict, dict)) and last in node:
            current = node[last]
        elif isinstance(last, int) and isinstance(node, (list, tuple)) and last < len(node):
            current = node[last]
        if isinstance(current, (ml_collections.ConfigDict, dict, list, tuple)):
            current = None          # a whole sub-config replaced: take the literal as given
        try:
            value = parse_value(text, current)
        except ValueError as e:
            raise ValueError(f"{path}={text!r}: {e}") from None
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        _set(node, last, value, path)
        key = tuple(steps)
        for set_before in [k for k in nulled if k[:len(key)] == key]:     # this override replaced them
            del nulled[set_before]
        if value is None:
            nulled[key] = f"{path}={text}"
