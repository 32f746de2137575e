"""Plumbing shared by the experiment sweeps (``experiments/<name>/run.py``): arguments, sibling modules, provenance.

Every experiment's ``run.py`` trains variants x seeds with the library's trainer and writes one JSON per run; this
module holds what is the same in all of them, so that forking an experiment copies only paper-specific code.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from types import ModuleType
from typing import Any, Sequence


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The common sweep flags: --preset, --variants, --seeds, --workdir, --results, --threads, --table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="full")
    p.add_argument("--variants", default=None, help="comma-separated; default: all of config.VARIANTS")
    p.add_argument("--seeds", default=None, help="comma-separated; default: config.SEEDS[preset]")
    p.add_argument("--workdir", default=f"/tmp/moejax_experiments/{name}")
    p.add_argument("--results", default=None, help=f"default: experiments/{name}/results/<preset>")
    p.add_argument("--threads", type=int, default=None, help="pin XLA:CPU to one thread when 1 (set before jax)")
    p.add_argument("--table", action="store_true", help="only print the markdown table of the existing results")
    return p


def pin_one_thread() -> None:
    """Single-threaded XLA:CPU Eigen, so that two sweeps can share a 2-core machine; call before jax starts."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def load_sibling(run_file: str, prefix: str, name: str) -> ModuleType:
    """``<dir of run_file>/<name>.py`` imported as module ``<prefix>_<name>`` (every experiment has a config.py)."""
    full = f"{prefix}_{name}"
    if full not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(run_file)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def code_version() -> dict[str, Any]:
    """Which moejax ran: its path, the git commit of its checkout (if any), and ``$MOEJAX_CODE_VERSION``."""
    import moejax
    root = os.path.dirname(os.path.dirname(os.path.abspath(moejax.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"moejax_path": root, "git_commit": commit, "note": os.environ.get("MOEJAX_CODE_VERSION")}


def machine() -> dict[str, Any]:
    """Backend, device and core counts, uname and XLA_FLAGS of this run (imports jax)."""
    import jax
    return {"platform": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "uname": " ".join(os.uname()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    import numpy as np
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
