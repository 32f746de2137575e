"""Quiet, shareable libtpu on hosts without a TPU (it is installed for ahead-of-time TPU compiles, :mod:`moejax.aot`).

With ``libtpu`` installed, jax tries the TPU backend at its first device query, and libtpu, finding no TPU and no
Cloud TPU metadata, prints four lines of warnings to stderr on every start; two processes that load it on one host
(pytest-xdist workers compiling for a TPU topology) fail on its per-host lock file. On a host with no TPU chip on its
PCI bus neither protects anything, so :func:`prepare` sets, only where they are unset:

- ``TPU_SKIP_MDS_QUERY=1``: no Cloud TPU metadata-server query (jax sets it too on such hosts);
- ``TPU_ACCELERATOR_TYPE`` and ``TPU_WORKER_HOSTNAMES``: a one-host value, so libtpu does not warn that it could
  not determine them (they only describe the host's own TPUs, of which there are none; a compile target is named
  explicitly, ``jax.experimental.topologies.get_topology_desc``);
- ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``: no lock file.

On a TPU host (or with libtpu absent) nothing is touched. Measured on a 2-core CPU machine (2026-12-07, jax 0.10.2,
libtpu 0.0.42.1): the first ``jax.devices()`` takes 65 ms more with libtpu installed (70 vs 6 ms) and ``import jax``
the same (about 1 s).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

_GOOGLE_PCI_VENDOR = "0x1ae0"          # TPU chips are PCI devices of Google's vendor id
QUIET_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def host_has_tpu() -> bool:
    """Whether a PCI device of Google's vendor id (a TPU chip) is on this host."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(path).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def libtpu_installed() -> bool:
    """Whether the ``libtpu`` package (or ``TPU_LIBRARY_PATH``) is there."""
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def prepare() -> None:
    """Sets :data:`QUIET_ENV` (where unset) on a host with libtpu and no TPU; otherwise does nothing. Must run before
    jax first loads libtpu (its first device query, or the first TPU topology)."""
    if libtpu_installed() and not host_has_tpu():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


__all__ = ["QUIET_ENV", "host_has_tpu", "libtpu_installed", "prepare"]
