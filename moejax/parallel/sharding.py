"""Shardings of the train state and the batches, from logical axis names and the rules table."""
from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.parallel.mesh import TOKEN_AXES, Rules

log = logging.getLogger("moejax")


def path_name(path: tuple[Any, ...]) -> str:
    """``'layer_0/router/kernel'`` for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _mesh_spec(path: str, shape: tuple[int, ...], names: tuple[str | None, ...], mesh: Mesh,
               rules: Rules) -> PartitionSpec:
    """The mesh PartitionSpec of one array; a dimension its mesh axes do not divide is left unsharded.

    The ``expert`` dimension is the exception: experts that do not split evenly over the ``expert`` axis are
    an error (expert parallelism would have to pad experts, which we do not do silently).
    """
    spec = list(nn.logical_to_mesh_axes(names, rules))
    spec += [None] * (len(shape) - len(spec))
    for i, (dim, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % size == 0:
            continue
        if names[i] == "expert":
            raise ValueError(f"num_experts={dim}: must be divisible by the mesh axes {axes} ({size} devices) that "
                             f"shard the experts (parameter {path})")
        log.info("moejax: %s dim %d (%s, size %d) is not divisible by mesh axes %s (%d); replicating it",
                 path, i, names[i], dim, axes, size)
        spec[i] = None
    return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every leaf of an (abstract) state whose parameters are still boxed.

    ``abstract_state`` comes from ``jax.eval_shape`` of an init that keeps flax's ``nn.Partitioned`` boxes
    (optax states built from boxed parameters carry the same boxes). Boxed leaves are sharded by their logical
    names through ``rules``; every other leaf (step, RNG, counters, non-gradient layer state) is replicated.
    The result has the structure of the *unboxed* state.
    """
    def one(path, leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            return NamedSharding(mesh, _mesh_spec(path_name(path), tuple(value.shape), tuple(leaf.names), mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over every token axis of the mesh (data, fsdp, expert)."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in TOKEN_AXES if a in mesh.axis_names)))


def describe(shardings: Any) -> list[str]:
    """One line per distinct (path prefix, spec) for logging: ``experts/w_in: P('expert', 'fsdp', 'tensor')``."""
    lines = []
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        if isinstance(s, NamedSharding) and any(a is not None for a in s.spec):
            lines.append(f"{path_name(path)}: {s.spec}")
    return lines
