"""The device mesh and the logical-axis rules, built from the ``mesh`` section of an experiment config.

One mesh with four named axes, in this order: ``data`` (pure data parallelism: the batch is split, the
state replicated), ``fsdp`` (the batch is split *and* parameters and optimiser state are sharded along their
``embed`` axis, gathered where used), ``expert`` (experts are split; the batch is split over it too, so that
every device of an expert group holds different tokens and expert parallelism is an all-to-all), and
``tensor`` (Megatron-style: the ``mlp``, ``heads`` and ``vocab`` axes of weights are split, tokens are
replicated). Any axis may be 1. ``-1`` for one axis means "all the devices the others leave".

The rules table maps the logical axis names carried by parameters (``nn.with_logical_partitioning``) and
activations (``nn.with_logical_constraint``) to mesh axes; flax uses the first rule whose mesh axes are not
already taken by another dimension of the same array, so ``('batch', 'length', 'embed')`` activations get
``embed`` unsharded when ``fsdp`` already splits the batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from moejax.errors import unknown_field

AXES = ("data", "fsdp", "expert", "tensor")
# Mesh axes that split tokens (the logical ``batch`` axis). Order matters: it is the order of the shards.
TOKEN_AXES = ("data", "fsdp", "expert")
Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", TOKEN_AXES),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("glu", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes (``-1``: the remaining devices, for at most one axis) and extra rules.

    Attributes:
      data, fsdp, expert, tensor: axis sizes; their product must equal the number of devices.
      rules: ``(logical name, mesh axis | tuple of mesh axes | None)`` pairs tried *before*
        :data:`DEFAULT_RULES` (so they override it).
      distributed: call ``jax.distributed.initialize`` before anything touches the devices: ``auto``
        (when the launcher's environment says there are several processes, see
        :func:`moejax.parallel.distributed.maybe_initialize`), ``always`` or ``never``.
      coordinator_address, num_processes, process_id: passed to ``jax.distributed.initialize`` when set
        (otherwise it reads them from the environment / cluster detection).
      num_devices: use only the first ``num_devices`` devices (default: all), e.g. to restore a checkpoint
        onto a smaller mesh on the same machine.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: Rules = ()
    distributed: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    num_devices: int | None = None

    def __post_init__(self) -> None:
        fills = [a for a in AXES if getattr(self, a) == -1]
        if len(fills) > 1:
            raise ValueError(f"mesh.{fills[1]}=-1: at most one mesh axis may be -1 (already mesh.{fills[0]})")
        for a in AXES:
            v = getattr(self, a)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"mesh.{a}={v!r}: must be an integer >= 1, or -1 for the remaining devices")
        for i, rule in enumerate(self.rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"mesh.rules[{i}]={rule!r}: must be a (logical axis name, mesh axes) pair")
            for m in (rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)):
                if m is not None and m not in AXES:
                    raise ValueError(f"mesh.rules[{i}]={rule!r}: unknown mesh axis {m!r}; mesh axes are {list(AXES)}")
        if self.num_devices is not None and (isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int)
                                             or self.num_devices < 1):
            raise ValueError(f"mesh.num_devices={self.num_devices!r}: must be an integer >= 1 or None (all devices)")
        if self.distributed not in ("auto", "always", "never"):
            raise ValueError(f"mesh.distributed={self.distributed!r}: must be one of ['auto', 'always', 'never']")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MeshConfig":
        """From the ``mesh`` section of a config (a dict or ConfigDict; None -> all devices on ``data``)."""
        if d is None:
            return cls()
        d = dict(d.items())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise unknown_field(f"mesh.{unknown[0]}", names)
        if d.get("rules") is None:
            d.pop("rules", None)
        else:
            d["rules"] = tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in d["rules"])
        return cls(**d)

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with ``-1`` resolved; errors name the field when the product is not ``num_devices``."""
        sizes = {a: getattr(self, a) for a in AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        fill = [a for a, v in sizes.items() if v == -1]
        if fill:
            if num_devices % fixed:
                raise ValueError(f"mesh.{fill[0]}=-1: the other axes ({fixed} devices) do not divide the "
                                 f"{num_devices} devices")
            sizes[fill[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh: data*fsdp*expert*tensor = {'*'.join(str(sizes[a]) for a in AXES)} = "
                             f"{math.prod(sizes.values())} must equal the number of devices ({num_devices})")
        return sizes

    def all_rules(self) -> Rules:
        return tuple(tuple(r) for r in self.rules) + DEFAULT_RULES


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all, in ``jax.devices()`` order) with axes :data:`AXES`.

    Devices are laid out row-major over ``(data, fsdp, expert, tensor)``: ``tensor`` neighbours are adjacent
    devices (on one host first), and a process's devices form a contiguous block of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices is not None:
        if config.num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={config.num_devices}: only {len(devices)} devices are available")
        devices = devices[:config.num_devices]
    sizes = config.shape(len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES)


def token_shards(mesh: Mesh) -> int:
    """Number of token shards: the product of the mesh axes that split the batch."""
    return math.prod(mesh.shape.get(a, 1) for a in TOKEN_AXES)
