"""Meshes, sharding rules, expert parallelism and multi-process runs (see README "Meshes and sharding")."""
from moejax.parallel.distributed import maybe_initialize
from moejax.parallel.expert_parallel import (ExpertParallel, capacity_apply, check_expert_parallel, dropless_apply,
                                             expert_mesh, ragged_all_to_all_emulated)
from moejax.parallel.mesh import AXES, DEFAULT_RULES, TOKEN_AXES, MeshConfig, make_mesh, token_shards
from moejax.parallel.sharding import batch_sharding, describe, state_shardings

__all__ = ["AXES", "DEFAULT_RULES", "ExpertParallel", "MeshConfig", "TOKEN_AXES", "batch_sharding", "capacity_apply",
           "check_expert_parallel", "describe", "dropless_apply", "expert_mesh", "make_mesh", "maybe_initialize",
           "ragged_all_to_all_emulated", "state_shardings", "token_shards"]
