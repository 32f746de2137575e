"""Backends of one operation, and the selection of one by its config name on a platform.

A :class:`Backend` says which platforms it runs on: ``platforms`` compiled (``"*"``: any platform XLA compiles for,
the pure-XLA formulations), ``interpret`` in the Pallas interpreter (a Pallas kernel on CPU). An :class:`Operation`
holds the registered backends of one operation and its *aliases*: config names that stand for an ordered list of
backends per platform (``auto``; ``pallas``: the Pallas kernel of the platform). :meth:`Operation.select` resolves
a config name on a platform to one backend: a backend name stands for itself; an alias takes the first backend of
its list for the platform that is registered and supports the platform (the fallback order). A backend that does not
support the platform is a one-line ValueError naming the config field and the platform. Every selection is logged at
INFO once per (config field, name, platform) per process.

Platforms are jax platform names (``cpu``, ``gpu``, ``tpu``; ``cuda``/``rocm`` count as ``gpu``), of the program being
traced: the platform of the devices of the mesh in context (``jax.set_mesh``, concrete or abstract: a TPU topology
compiled ahead of time from a CPU host selects the TPU kernels, compiled, not interpreted), else
``jax.default_backend()`` (:func:`current_platform`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

import jax

ANY = "*"                       # in Backend.platforms: every platform XLA compiles for
log = logging.getLogger("moejax")
_logged: set[tuple[str, str, str]] = set()


def mesh_platform() -> str | None:
    """The platform of the devices of the mesh in context (``jax.set_mesh``; inside ``shard_map`` too), or None
    when there is none or it does not say (an abstract mesh made without devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    device = getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None)


def current_platform(platform: str | None = None) -> str:
    """``platform``; else the platform the traced program is for: the context mesh's devices', else jax's default
    backend; as a platform name (``cuda``/``rocm`` -> ``gpu``)."""
    platform = platform or mesh_platform() or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def forget_logged() -> None:
    """Lets every selection log again (tests that check the log line)."""
    _logged.clear()


def _words(platforms: Iterable[str]) -> str:
    return " and ".join(p.upper() for p in platforms)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an operation.

    name: the config name that selects it. platforms: where it runs compiled (``"*"``: anywhere XLA compiles).
    interpret: where it runs in the Pallas interpreter (its functions then get ``interpret=True``; on
    ``platforms``, ``interpret=False``). kernel: what runs, in words, for the log line (``"XLA"``, ``"Triton
    kernel"``, ...). Subclasses add the operation's functions (:class:`~moejax.dispatch.backends.gmm.GmmBackend`,
    :class:`~moejax.dispatch.backends.capacity.CapacityBackend`).
    """

    name: str
    platforms: tuple[str, ...] = dataclasses.field(default=(ANY,), kw_only=True)
    interpret: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    kernel: str = dataclasses.field(default="XLA", kw_only=True)

    def supports(self, platform: str) -> bool:
        return ANY in self.platforms or platform in self.platforms or platform in self.interpret

    def interpreted(self, platform: str) -> bool:
        """Whether it runs in the Pallas interpreter on ``platform``."""
        return platform in self.interpret

    def partitionable(self, platform: str) -> bool:
        """Whether XLA can split its calls over a mesh by itself: not a compiled Pallas kernel (a custom call XLA
        cannot partition; it has to run per device, under ``shard_map``)."""
        return not self.interpret or self.interpreted(platform)

    def _interpret_kwargs(self, platform: str) -> dict:
        return {"interpret": self.interpreted(platform)} if self.interpret else {}

    def where(self) -> str:
        """Its platforms in words, e.g. ``GPU (the Pallas interpreter on CPU)``."""
        native = "any platform" if ANY in self.platforms else _words(self.platforms)
        return native + (f" (the Pallas interpreter on {_words(self.interpret)})" if self.interpret else "")


class Operation:
    """The backends of one operation, its aliases and its selection function.

    field: the config field that names a backend (``dispatch.gmm``), used in errors and the log line; what: the
    operation in words; aliases: ``{alias: {platform or "*": (backend names, in fallback order)}}``; hint: what an
    error suggests instead.
    """

    def __init__(self, field: str, what: str, aliases: dict[str, dict[str, Sequence[str]]], hint: str):
        self.field, self.what, self.hint = field, what, hint
        self.backends: dict[str, Backend] = {}
        self.aliases = {a: {p: tuple(names) for p, names in per.items()} for a, per in aliases.items()}

    def register(self, backend: Backend, *, prefer_for: Sequence[str] = ()) -> Backend:
        """Makes ``backend`` selectable by its name (replacing one of that name). ``prefer_for``: platforms on
        which it goes first in ``auto``'s fallback list (a measured-faster third-party backend)."""
        if backend.name in self.aliases:
            raise ValueError(f"{self.field}={backend.name!r}: is an alias of this operation, not a backend name")
        self.backends[backend.name] = backend
        for platform in prefer_for:
            per = self.aliases.setdefault("auto", {})
            rest = [n for n in per.get(platform, per.get(ANY, ())) if n != backend.name]
            per[platform] = (backend.name, *rest)
        return backend

    def names(self) -> list[str]:
        """Every config name: the backends and the aliases."""
        return sorted(set(self.backends) | set(self.aliases))

    def candidates(self, name: str, platform: str) -> tuple[str, ...]:
        """The backend names ``name`` may stand for on ``platform``, in fallback order."""
        if name in self.aliases:
            per = self.aliases[name]
            return tuple(per.get(platform, per.get(ANY, ())))
        if name in self.backends:
            return (name,)
        raise ValueError(f"{self.field}={name!r}: unknown {self.what}; must be one of {self.names()}")

    def resolve(self, name: str, platform: str | None = None) -> Backend:
        """The backend ``name`` stands for on ``platform`` (default: jax's backend), without logging."""
        platform = current_platform(platform)
        names = self.candidates(name, platform)
        for candidate in names:
            backend = self.backends.get(candidate)
            if backend is not None and backend.supports(platform):
                return backend
        if name in self.backends:
            backend = self.backends[name]
            raise ValueError(f"{self.field}={name!r}: runs only on {backend.where()}, not on platform "
                             f"{platform!r}; use {self.hint}")
        tried = ", ".join(f"{n} ({self.backends[n].where() if n in self.backends else 'not registered'})"
                          for n in names) or "none"
        raise ValueError(f"{self.field}={name!r}: no backend for platform {platform!r} (candidates: {tried}); "
                         f"use {self.hint}")

    def select(self, name: str, platform: str | None = None) -> Backend:
        """:meth:`resolve`, with one INFO line per (field, name, platform) per process saying what runs."""
        platform = current_platform(platform)
        backend = self.resolve(name, platform)
        key = (self.field, name, platform)
        if key not in _logged:
            _logged.add(key)
            how = backend.kernel + (" in the Pallas interpreter" if backend.interpreted(platform) else "")
            log.info("moejax: %s=%s -> %s (%s) on backend %s", self.field, name, backend.name, how, platform)
        return backend


__all__ = ["ANY", "Backend", "Operation", "current_platform", "forget_logged", "mesh_platform"]
