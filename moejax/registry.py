"""One registry for every kind of plug-in: one lookup, one closest-name error, one rule for duplicates.

Router kinds, transforms, scorers, losses, attention kinds, dispatch modes and Hugging Face families are each a
:class:`Registry` of classes (or instances) registered by name with a decorator. The duplicate rule is the same for
all of them: registering a name again with *the same definition* (same qualified name, defined in the same file, as
when an experiment's module is imported once by path and once as a package) replaces the entry; a different
definition under a taken name is an error naming both, so two experiments never silently replace each other's plug-in.
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable, Generic, Iterator, TypeVar

from moejax.errors import closest

T = TypeVar("T")


def _definition(entry: object) -> tuple[str, str | None]:
    """(qualified name, source file) of a registered class, or of an instance's class."""
    cls = entry if isinstance(entry, type) else type(entry)
    module = sys.modules.get(cls.__module__)
    try:
        source = inspect.getsourcefile(module) if module is not None else None
    except TypeError:        # built-in module
        source = None
    return cls.__qualname__, source


class Registry(Generic[T]):
    """Plug-ins of one kind by name, in registration order.

    Args:
      what: how errors name one entry (``router kind``).
      field: the config field that selects an entry (``router.kind``), for the one-line lookup error.
      name_of: the entry's name (default: its ``name`` attribute).
    """

    def __init__(self, what: str, field: str, name_of: Callable[[T], str] = lambda e: e.name) -> None:
        self.what, self.field, self._name_of = what, field, name_of
        self._entries: dict[str, T] = {}

    def add(self, entry: T) -> T:
        """Registers ``entry`` under its name (see the module doc for duplicates); returns it (a decorator)."""
        name = self._name_of(entry)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.what}: {entry!r} has no name")
        old = self._entries.get(name)
        if old is not None and old is not entry and _definition(old) != _definition(entry):
            old_cls = old if isinstance(old, type) else type(old)
            new_cls = entry if isinstance(entry, type) else type(entry)
            raise ValueError(f"{self.what} {name!r} is already registered by {old_cls.__module__}."
                             f"{old_cls.__qualname__}; {new_cls.__module__}.{new_cls.__qualname__} must choose "
                             f"another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregisters ``name`` (a plug-in defined inside a test or a notebook cell, after use)."""
        self._entries.pop(name, None)

    def get(self, name: object) -> T:
        """The entry ``name``; else ``<field>=<name>: unknown <what> (did you mean ...?); registered: [...]``."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"{self.field}={name!r}: unknown {self.what}{closest(str(name), self._entries)}; "
                             f"registered: {sorted(self._entries)}")
        return self._entries[name]

    def find(self, name: str) -> T | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) in registration order."""
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
