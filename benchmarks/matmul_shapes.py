"""How fast this backend multiplies at the MoE benchmark's shapes: the dense FFN's matmuls against one expert's.

For S1 and S2 of ``benchmarks/moe_layer.py``, the forward matmuls of the dense FFN of width K·F
(``[T, D] @ [D, K·F]``), of one expert at the balanced load (``[T·K/E, D] @ [D, F]``) and of all experts batched
(``[E, T·K/E, D] @ [E, D, F]``), each timed as a jitted XLA dot and, for the 2-D ones, as numpy's ``@`` (the BLAS
numpy was built with, OpenBLAS in PyPI wheels; what a native grouped-matmul kernel calling a BLAS per expert would
get). Printed: milliseconds and GFLOP/s, medians over rounds, all shapes interleaved round after round.

    python benchmarks/matmul_shapes.py [--rounds 21] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = {"S1": dict(t=2048, d=512, f=1024, e=8, k=2), "S2": dict(t=1024, d=512, f=256, e=64, k=8)}


def cases(s: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """name -> (lhs shape, rhs shape) of one setting."""
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    r = t * k // e
    return {"dense [T,D]@[D,KF]": ((t, d), (d, k * f)), "one expert [TK/E,D]@[D,F]": ((r, d), (d, f)),
            "batched experts [E,TK/E,D]@[E,D,F]": ((e, r, d), (e, d, f))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--settings", default="S1,S2")
    parser.add_argument("--shrink", type=int, default=1, help="divide every dimension by this (the test suite)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    calls, flops = {}, {}
    for name in args.settings.split(","):
        s = {key: max(1, v // args.shrink) if key in "tdf" else v for key, v in SETTINGS[name].items()}
        for label, (ls, rs) in cases(s).items():
            a, b = rng.standard_normal(ls, np.float32), rng.standard_normal(rs, np.float32)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            dot = jax.jit(jnp.matmul).lower(ja, jb).compile()
            flops[(name, label)] = 2.0 * np.prod(ls) * rs[-1]
            calls[(name, label, "xla")] = lambda dot=dot, ja=ja, jb=jb: jax.block_until_ready(dot(ja, jb))
            if len(ls) == 2:
                calls[(name, label, "numpy")] = lambda a=a, b=b: a @ b
    times = {key: [] for key in calls}
    for round_ in range(args.rounds + 1):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[key].append(time.perf_counter() - start)
    print(f"jax {jax.__version__}, numpy {np.__version__}, backend {jax.default_backend()}, {args.rounds} rounds")
    rows = []
    for (name, label, impl), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        rows.append({"setting": name, "matmul": label, "impl": impl, "ms": ms,
                     "gflops": flops[(name, label)] / ms / 1e6})
        print(f"{name} {label:36s} {impl:6s} {ms:8.3f} ms {rows[-1]['gflops']:7.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "numpy": np.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
