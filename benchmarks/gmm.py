"""Grouped matmul alone, forward+backward, against a dense matmul of the same total size, in one process.

``gmm(lhs[M, K], rhs[E, K, N], group_sizes)`` does ``M * K * N`` useful multiply-adds, as does one dense
``[M, K] @ [K, N]``; printed is ``dense_time / gmm_time`` (median, min-max over interleaved rounds) per
registered implementation, for balanced and Zipf-skewed group sizes.

``--impls`` may also name ``slabs``: not a grouped matmul but its ceiling for a balanced routing on this
backend, one batched matmul ``[E, M/E, K] @ [E, K, N]`` of the rows as they are (no sort, no copies, no
overflow), timed for the balanced sizes only. ``bulk`` on a balanced routing does exactly this matmul plus
its row copies, so ``slabs`` bounds every slab-based formulation (``bulk``, capacity dispatch).

    python benchmarks/gmm.py [--m 4096 --k 512 --n 1024 --e 8] [--impls bulk,padded,blocked] [--rounds 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.dispatch import get_gmm


def group_sizes(m: int, e: int, skew: str) -> jnp.ndarray:
    p = np.ones(e) if skew == "balanced" else 1.0 / np.arange(1, e + 1)
    sizes = np.floor(p / p.sum() * m).astype(int)
    sizes[0] += m - sizes.sum()
    return jnp.asarray(sizes, jnp.int32)


def slabs(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs[M, K] as E equal groups times rhs[E, K, N], one batched matmul (correct for equal group sizes only)."""
    e, k, n = rhs.shape
    out = jnp.einsum("egk,ekn->egn", lhs.reshape(e, -1, k), rhs, preferred_element_type=jnp.float32)
    return out.reshape(-1, n).astype(lhs.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("m", 4096), ("k", 512), ("n", 1024), ("e", 8), ("rounds", 7), ("tile", 32)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--impls", default="bulk,padded,blocked")
    parser.add_argument("--json")
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    lhs = jax.random.normal(keys[0], (args.m, args.k))
    rhs = jax.random.normal(keys[1], (args.e, args.k, args.n))
    cot = jax.random.normal(keys[2], (args.m, args.n))
    dense_w = rhs[0]
    dense = jax.jit(jax.grad(lambda a, b: jnp.sum((a @ b) * cot), argnums=(0, 1)))
    results = []
    for skew in ("balanced", "zipf"):
        gs = group_sizes(args.m, args.e, skew)
        calls = {"dense": lambda: dense(lhs, dense_w)}
        for name in args.impls.split(","):
            if name == "slabs":
                if skew != "balanced" or args.m % args.e:
                    continue
                f = slabs
            else:
                f = get_gmm(name, tile=args.tile)
            g = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b, gs) * cot), argnums=(0, 1)))
            calls[name] = lambda g=g: g(lhs, rhs)
        for call in calls.values():
            jax.block_until_ready(call())
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(call())
                times[name].append(time.perf_counter() - start)
        print(f"M={args.m} K={args.k} N={args.n} E={args.e} tile={args.tile} {skew} sizes={np.asarray(gs).tolist()}: "
              f"dense fwd+bwd {1e3 * statistics.median(times['dense']):.1f} ms")
        for name in calls:
            if name == "dense":
                continue
            r = [d / t for d, t in zip(times["dense"], times[name])]
            row = {"skew": skew, "impl": name, "ms": 1e3 * statistics.median(times[name]),
                   "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}
            results.append(row)
            print(f"  {name:10s} {row['ms']:8.1f} ms  dense/gmm {row['ratio_median']:.3f} "
                  f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
