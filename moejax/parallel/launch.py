"""Run one command as N cooperating JAX processes on this machine (multi-process runs on localhost).

    python -m moejax.parallel.launch --num_processes=2 --devices_per_process=4 -- \\
        python -m moejax.main --config=configs/lm_tiny.py --config.mesh.expert=4 --workdir=/tmp/lm2

Each process gets ``MOEJAX_COORDINATOR_ADDRESS`` / ``MOEJAX_NUM_PROCESSES`` / ``MOEJAX_PROCESS_ID`` (read by
:func:`moejax.parallel.maybe_initialize`) and, on CPU, ``--xla_force_host_platform_device_count`` so that it
simulates ``devices_per_process`` devices. On a real cluster use the cluster's launcher instead (SLURM, a TPU
pod's ``gcloud ... --worker=all``) with ``--config.mesh.distributed=always``, or set the three variables yourself.
The exit status is the first non-zero status of the processes (all are stopped if one fails).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def process_env(base: dict[str, str], port: int, num_processes: int, process_id: int,
                devices_per_process: int | None) -> dict[str, str]:
    env = dict(base)
    env.update({"MOEJAX_COORDINATOR_ADDRESS": f"localhost:{port}", "MOEJAX_NUM_PROCESSES": str(num_processes),
                "MOEJAX_PROCESS_ID": str(process_id)})
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return env


def launch(command: list[str], num_processes: int, devices_per_process: int | None = None,
           env: dict[str, str] | None = None, timeout: float | None = None) -> list[subprocess.CompletedProcess]:
    """Runs ``command`` ``num_processes`` times with the coordination variables; returns their results."""
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: must be >= 1")
    port = free_port()
    base = dict(os.environ if env is None else env)
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(num_processes)]   # pipes could fill up and block
    procs = [subprocess.Popen(command, env=process_env(base, port, num_processes, i, devices_per_process),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
             for i, log in enumerate(logs)]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or (deadline and time.monotonic() > deadline):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, log in zip(procs, logs):
        code = p.wait()
        log.seek(0)
        results.append(subprocess.CompletedProcess(command, code, log.read(), None))
        log.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="simulated CPU devices per process (sets XLA_FLAGS)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: give the command after --")
    results = launch(command, args.num_processes, args.devices_per_process)
    for i, r in enumerate(results):
        for line in r.stdout.splitlines():
            print(f"[process {i}] {line}")
    return next((r.returncode for r in results if r.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
