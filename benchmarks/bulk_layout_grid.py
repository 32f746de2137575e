"""The measurement behind ``bulk``'s layout rule (``moejax.dispatch.bulk_ffn.layout_rule``): MoELayer with its learned
router, ``value_and_grad`` of ``sum(y * cot)`` into x and every parameter, one program per candidate layout, timed
interleaved with the dense FFN of the same active width; ratio = dense time / MoE time (median [min, max]).

    python benchmarks/bulk_layout_grid.py S1 zipf "64;128,32;256,64@0.5" 11 [glu|mlp]

A candidate is ``tiles[@slab]``: overflow tile levels (decreasing) and the slab rows per expert as a fraction of
M / E (default 1). S1: T=2048, D=512, F=1024, E=8, K=2 (M / E = 512); S2: T=1024, D=512, F=256, E=64, K=8 (128).
Zipf: router-logit offsets -0.5 log(i + 1), as in benchmarks/moe_layer.py.
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp

from moejax.config import DispatchConfig, MoEConfig
from moejax.layers import DenseLayer, MoELayer
from moejax.routing.config import RouterConfig

SETTINGS = {"S1": dict(t=2048, d=512, f=1024, e=8, k=2), "S2": dict(t=1024, d=512, f=256, e=64, k=8)}
ZIPF_SKEW = 0.5


def parse_candidate(item: str) -> tuple[tuple[int, ...], float]:
    """``'256,64@0.5'`` -> ``((256, 64), 0.5)``; no ``@``: slab 1."""
    tiles, _, slab = item.partition("@")
    return tuple(int(v) for v in tiles.split(",")), float(slab) if slab else 1.0


def main(setting: str, routing: str, spec: str, rounds: int, kind: str = "glu") -> dict[str, float]:
    s = SETTINGS[setting]
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    act = "silu" if kind == "glu" else "gelu"
    keys = jax.random.split(jax.random.key(1), 4)
    x, cot = jax.random.normal(keys[0], (t, d)), jax.random.normal(keys[1], (t, d))
    calls = {}

    def add(label, module, variables):
        params, rest = variables["params"], {c: v for c, v in variables.items() if c != "params"}

        def loss(p, xx):
            return jnp.sum(module.apply({"params": p, **rest}, xx, deterministic=True).y * cot)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
        jax.block_until_ready(compiled(params, x))
        calls[label] = lambda: compiled(params, x)

    dense = DenseLayer(k * f, kind, act, False, "float32", "float32")
    add("dense", dense, jax.jit(dense.init)(keys[2], x))
    for item in spec.split(";"):
        tiles, slab = parse_candidate(item)
        cfg = MoEConfig(num_experts=e, hidden_dim=f, expert_kind=kind, activation=act, use_bias=False,
                        router=RouterConfig(k=k, renormalize=True, steer=routing == "zipf"),
                        dispatch=DispatchConfig(mode="dropless", gmm="bulk", gmm_tile=tiles, bulk_slab=slab))
        layer = MoELayer(cfg)
        variables = dict(jax.jit(layer.init)(keys[3], x))
        if routing == "zipf":
            variables["moe_state"] = {"router": {"steer_offset": -ZIPF_SKEW * jnp.log1p(jnp.arange(e, dtype=jnp.float32))}}
        add(item, layer, variables)
    times = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[label].append(time.perf_counter() - start)
    out = {}
    for label in calls:
        ratios = [a / b for a, b in zip(times["dense"], times[label])]
        out[label] = statistics.median(ratios)
        print(f"{setting} {kind} {routing:8s} {label:14s} {1e3 * statistics.median(times[label]):7.1f} ms ratio "
              f"{out[label]:.3f} [{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *(sys.argv[5:6] or ["glu"]))
