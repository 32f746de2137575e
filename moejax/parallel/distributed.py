"""Joining several processes into one JAX runtime (``jax.distributed.initialize``) from config or environment.

The same entry point runs one process or many: every process runs
``python -m moejax.main --config=... --workdir=<shared dir>`` and they find each other through

* the config: ``mesh.coordinator_address``, ``mesh.num_processes``, ``mesh.process_id``; or
* the environment: ``MOEJAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``MOEJAX_NUM_PROCESSES``,
  ``MOEJAX_PROCESS_ID`` (what ``scripts``/launchers set on localhost or a plain cluster); or
* JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pods, Kubernetes) with ``mesh.distributed='always'``.

Each process then reads only its slice of every global batch (``moejax.data`` takes the process index and
count) and the trainer assembles global arrays with ``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import logging
import os

import jax

from moejax.parallel.mesh import MeshConfig

log = logging.getLogger("moejax")
ENV = ("MOEJAX_COORDINATOR_ADDRESS", "MOEJAX_NUM_PROCESSES", "MOEJAX_PROCESS_ID")


def _from_env() -> dict[str, object]:
    out: dict[str, object] = {}
    addr = os.environ.get(ENV[0])
    if addr:
        out["coordinator_address"] = addr
    for name, key in ((ENV[1], "num_processes"), (ENV[2], "process_id")):
        raw = os.environ.get(name)
        if raw is not None and raw != "":
            try:
                out[key] = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: must be an integer") from None
    return out


def maybe_initialize(config: MeshConfig) -> bool:
    """Calls ``jax.distributed.initialize`` when config or environment ask for several processes.

    Must run before anything touches the devices. Returns True if this call initialised the runtime.
    Config fields win over the environment. ``mesh.distributed='never'`` skips it, ``'always'`` calls it even
    with no address (JAX then detects the cluster), ``'auto'`` calls it only when an address is known.
    """
    if config.distributed == "never" or jax.distributed.is_initialized():
        return False
    kwargs = _from_env()
    for key in ("coordinator_address", "num_processes", "process_id"):
        value = getattr(config, key)
        if value is not None:
            kwargs[key] = value
    if config.distributed == "auto" and "coordinator_address" not in kwargs:
        return False
    n, i = kwargs.get("num_processes"), kwargs.get("process_id")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"mesh.num_processes={n!r}: must be an integer >= 1")
    if i is not None and n is not None and not 0 <= i < n:
        raise ValueError(f"mesh.process_id={i!r}: must be in [0, mesh.num_processes={n})")
    log.info("moejax: jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())))
    jax.distributed.initialize(**kwargs)
    return True
