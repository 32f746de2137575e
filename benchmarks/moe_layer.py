"""MoE layer (routed part) forward+backward against a dense FFN with the same active FLOPs, in one process.

For each setting and routing (balanced: every expert gets ``T * K / E`` copies; random: K distinct experts
drawn uniformly per token, so loads vary by sampling noise; zipf: expert ``i`` is chosen with probability
``~ 1 / (i + 1)``, K distinct experts per token) the routing is forced (an explicit
``Routing`` into ``moejax.dispatch.apply``), and every implementation is timed interleaved with the dense
FFN of hidden width ``K * F``, round after round. Printed: ``dense_time / moe_time`` (median and min-max
over rounds; > 1 means the MoE is faster) and the FLOPs XLA reports for the compiled fwd+bwd divided by the
useful FLOPs ``12 * T * K * D * F`` (MLP experts: two matmuls, forward and two backward products each).
XLA's cost analysis counts a while loop's body once, so for the loop-based gmms (``blocked``, ``padded``,
``bulk``) the work of the rows their matmuls actually process for this routing is printed as well
("block work/useful").

The headline (``--learned``, run first by default) is the layer as users run it: ``MoELayer`` with its own learned
router (top-k softmax, renormalised), loss through the layer's output, its value and the gradients into x and every
parameter, router included (``jax.value_and_grad``: in a network the layer's output always feeds what follows, so its
forward pass is computed; with ``jax.grad`` of the linear loss ``sum(y * cot)`` alone XLA drops the dense FFN's
output matmul as dead code, which a real training step never can; ``--grad-only`` measures that way), for MLP (GELU) and SwiGLU experts, with a balanced-at-init router and a Zipf-skewed one (fixed
router-logit offsets ``-0.5 * log(i + 1)`` through the ``steer`` transform; the measured busiest-expert load over
the mean is printed), against ``DenseLayer`` of width
``K * F`` of the same kind; the peak memory XLA plans for each compiled fwd+bwd (arguments + outputs + temporaries,
``memory_analysis``) and its temporaries alone are printed beside the ratio. Under balanced routing a diagnostic row,
``experts_alone``, times the expert FFNs alone with exactly ``T * K / E`` rows per expert known at compile time, one
batched matmul per weight and no router, gather or un-sort: all the useful expert work and nothing else, what the
layer would cost if routing were free. The forced-routing table stays as the diagnostic below it.

    python benchmarks/moe_layer.py [--json PATH] [--rounds 7] [--smoke] [--learned | --forced] [--grad-only]
                                   [--layers dropless_auto,...] [--kinds mlp,glu] [--settings S1,S2]

``benchmarks/torch_moe_layer.py`` times the same layer in PyTorch (``torch._grouped_mm``) the same way, for a
side-by-side in another environment (PyTorch is not a moejax dependency).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dispatch
from moejax.config import DispatchConfig, MoEConfig
from moejax.dispatch import padded_gmm
from moejax.layers import DenseLayer, MoELayer
from moejax.routing.config import RouterConfig
from moejax.experts.ffn import Dense, activation_fn, ffn
from moejax.routing import finish_token_choice

SETTINGS = {"S1": dict(t=2048, d=512, f=1024, e=8, k=2), "S2": dict(t=1024, d=512, f=256, e=64, k=8)}
SMOKE = {"smoke": dict(t=64, d=16, f=32, e=4, k=2)}
KIND, ACT = "mlp", "gelu"


def forced_routing(t: int, e: int, k: int, skew: str, seed: int = 0):
    """A token-choice Routing with K distinct experts per token: ``balanced`` round-robin, ``random`` (uniform)
    or ``zipf``."""
    if skew == "balanced":
        idx = (np.arange(t)[:, None] * k + np.arange(k)[None, :]) % e
    else:
        rng = np.random.default_rng(seed)
        p = np.ones(e) if skew == "random" else 1.0 / np.arange(1, e + 1)
        idx = np.stack([rng.choice(e, size=k, replace=False, p=p / p.sum()) for _ in range(t)])
    weight = np.full((t, k), 1.0 / k, np.float32)
    probs = jnp.full((t, e), 1.0 / e)
    return finish_token_choice(jnp.log(probs), probs, jnp.asarray(idx, jnp.int32), jnp.asarray(weight),
                               jnp.ones((t, k), bool))


def init(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def moe_loss(mode: str, capacity: int | None, impl: str, gmm_fn, fused_ffn=None) -> Callable:
    def loss(params, x, routing, cot):
        expert_fn = lambda xs, grouping: ffn(params, xs, grouping, kind=KIND, activation=ACT)  # noqa: E731
        y, _ = dispatch.apply(x, routing, expert_fn, mode=mode, capacity=capacity, capacity_impl=impl,
                              grouped_matmul=gmm_fn, fused_ffn=fused_ffn)
        return jnp.sum(y * cot)
    return loss


def dense_loss(params, x, routing, cot):
    del routing
    return jnp.sum(ffn(params, x, Dense(), kind=KIND, activation=ACT) * cot)


def implementations(s: dict) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (loss fn, group sizes -> rows the padded gmm's matmuls process (None: not a padded gmm))."""
    t, e, k = s["t"], s["e"], s["k"]
    m = t * k
    out = {}
    for tile in (8, 16, 32, 64):
        if tile > m // e * 2:
            continue
        out[f"dropless_padded_t{tile}"] = (moe_loss("dropless", None, "index", dispatch.get_gmm("padded", tile=tile)),
                                           functools.partial(padded_gmm.padded_rows, tb=tile))
        bulk_rows = functools.partial(padded_gmm.padded_rows, tb=tile, cb=padded_gmm.bulk_rows(m, e))
        # What the MoE layer runs for dispatch.gmm='bulk': the whole expert FFN in bulk's layout.
        out[f"dropless_bulk_t{tile}"] = (moe_loss("dropless", None, "index", dispatch.get_gmm("bulk", tile=tile),
                                                  dispatch.get_fused_ffn("bulk", tile=tile)), bulk_rows)
        # The same layout entered and left around each matmul (bulk as a plain gmm, e.g. under EP).
        out[f"dropless_bulkgmm_t{tile}"] = (moe_loss("dropless", None, "index", dispatch.get_gmm("bulk", tile=tile)),
                                            bulk_rows)
    blocked_tile = 128
    out["dropless_blocked_t128"] = (moe_loss("dropless", None, "index", dispatch.get_gmm("blocked", tile=blocked_tile)),
                                    lambda sizes: (-(-m // blocked_tile) + e - 1) * blocked_tile)
    for cf in (1.0, 1.25):
        cap = math.ceil(cf * t * k / e)
        for impl in ("einsum", "index"):
            out[f"capacity_{impl}_cf{cf}"] = (moe_loss("capacity", cap, impl, None), None)
    return out


def run_setting(name: str, s: dict, skew: str, rounds: int, only: list[str] | None) -> dict:
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (t, d))
    cot = jax.random.normal(keys[1], (t, d))
    routing = forced_routing(t, e, k, skew)
    moe_params = {"w_in": init(keys[2], (e, d, f), d), "w_out": init(keys[3], (e, f, d), f)}
    dense_params = {"w_in": init(keys[4], (d, k * f), d), "w_out": init(keys[5], (k * f, d), k * f)}
    useful = 12.0 * t * k * d * f
    fns: dict[str, tuple[Callable, object, float | None]] = {}

    sizes = np.bincount(np.asarray(routing.expert_index).reshape(-1), minlength=e)

    def add(label, loss, params, analytic):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        compiled = fn.lower(params, x, routing, cot).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        jax.block_until_ready(compiled(params, x, routing, cot))          # warm up
        fns[label] = (lambda: compiled(params, x, routing, cot), flops, analytic)

    add("dense", dense_loss, dense_params, None)
    for label, (loss, rows) in implementations(s).items():
        if only and not any(o in label for o in only):
            continue
        add(label, loss, moe_params, None if rows is None else 12.0 * rows(sizes) * d * f)
    times: dict[str, list[float]] = {label: [] for label in fns}
    ratios: dict[str, list[float]] = {label: [] for label in fns if label != "dense"}
    for round_ in range(rounds + 1):
        for label, (call, _, _) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[label].append(time.perf_counter() - start)
        if round_ == 0:                                    # the first round only warms caches
            times = {label: [] for label in fns}
            continue
        for label in ratios:
            ratios[label].append(times["dense"][-1] / times[label][-1])
    result = {"setting": name, **s, "routing": skew, "rounds": rounds, "useful_flops": useful,
              "dense_ms": 1e3 * statistics.median(times["dense"]),
              "dense_flop_ratio": fns["dense"][1] / useful, "impls": {}}
    print(f"\n{name} {s} routing={skew}: dense fwd+bwd {result['dense_ms']:.1f} ms (median of {rounds}), "
          f"XLA flops/useful {result['dense_flop_ratio']:.3f}")
    print(f"  {'implementation':28s} {'moe ms':>8s} {'dense/moe':>10s} {'[min, max]':>16s} {'XLA flops/useful':>17s} "
          f"{'block work/useful':>18s}")
    for label, r in ratios.items():
        _, flops, analytic = fns[label]
        row = {"moe_ms": 1e3 * statistics.median(times[label]), "ratio_median": statistics.median(r),
               "ratio_min": min(r), "ratio_max": max(r), "xla_flop_ratio": flops / useful,
               "block_work_ratio": None if analytic is None else analytic / useful}
        result["impls"][label] = row
        work = "" if analytic is None else f"{row['block_work_ratio']:.3f}"
        print(f"  {label:28s} {row['moe_ms']:8.1f} {row['ratio_median']:10.3f} "
              f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] {row['xla_flop_ratio']:17.3f} {work:>18s}")
    return result


# dropless_auto: the default layout (bulk on CPU with its measured layout rule); dropless_t64_full: the layout of
# the previous default (full M / E slabs, one overflow tile of 64 rows), the "before" of the same run.
LEARNED_DISPATCH = {"dropless_auto": DispatchConfig(mode="dropless"),
                    "dropless_t64_full": DispatchConfig(mode="dropless", gmm_tile=64),
                    "capacity_index_cf1.25": DispatchConfig(mode="capacity", capacity_impl="index",
                                                            capacity_factor=1.25, eval_capacity_factor=1.25)}
ZIPF_SKEW = 0.5          # E=8: load 0.38, 0.24, 0.14, 0.09, ... (max/mean ~3); E=64 K=8: max/mean ~7.7


def _memory_bytes(compiled) -> tuple[float, float]:
    """(peak, temporaries): XLA's planned arguments + outputs + temporaries, and the temporaries alone (the
    activations and workspace; arguments and outputs grow with the parameter count, E times the dense FFN's)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan"), float("nan")
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes), float(m.temp_size_in_bytes)


def _experts_alone_params(key, kind: str, e: int, d: int, f: int) -> dict:
    names = ("gate", "up", "down") if kind == "glu" else ("up", "down")
    keys = jax.random.split(key, len(names))
    return {n: init(kk, (e, f, d) if n == "down" else (e, d, f), f if n == "down" else d) for n, kk in zip(names, keys)}


def _experts_alone_loss(params: dict, x: jax.Array, *, kind: str, act: str, k: int, cot: jax.Array) -> jax.Array:
    """The expert FFNs alone under perfectly balanced routing: every expert gets exactly ``T * K / E`` rows, known at
    compile time, as one batched matmul ``[E, T*K/E, D]`` per weight, plain autodiff; no router, no gather, no
    un-sort (the K copies of each token are ``x`` tiled K times, and their outputs summed back). All the useful
    expert work of the layer and nothing else: what the layer would cost if routing were free. (One matmul per
    expert instead is slower on XLA:CPU, 0.22x of dense at S2, and its ~850 MiB of temporaries slowed the dense FFN
    timed after it, so it is not a row.)"""
    e, d = params["down"].shape[0], x.shape[-1]
    rows = jnp.tile(x, (k, 1)).reshape(e, -1, d)
    fn = activation_fn(act)
    mm = lambda a, w: jnp.einsum("erd,edf->erf", a, w)  # noqa: E731
    h = fn(mm(rows, params["gate"])) * mm(rows, params["up"]) if kind == "glu" else fn(mm(rows, params["up"]))
    return jnp.sum(mm(h, params["down"]).reshape(k, *x.shape).sum(0) * cot)


# The diagnostic row of the headline's balanced settings: the expert work alone, see _experts_alone_loss.
EXPERTS_ALONE = "experts_alone"


def run_learned(name: str, s: dict, kind: str, skew: str, rounds: int, grad_only: bool = False,
                labels: tuple[str, ...] = tuple(LEARNED_DISPATCH)) -> dict:
    """The layer as users run it: learned router, loss value and gradients into everything; ratio = dense time / MoE
    time. ``grad_only``: gradients without the loss value (lets XLA skip outputs that only the value needs)."""
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    act = "silu" if kind == "glu" else ACT
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (t, d))
    cot = jax.random.normal(keys[1], (t, d))
    fns: dict[str, tuple[Callable, float, float]] = {}
    loads: dict[str, float] = {}

    def add_loss(label, loss, params):
        transform = jax.grad if grad_only else jax.value_and_grad
        compiled = jax.jit(transform(loss, argnums=(0, 1))).lower(params, x).compile()
        jax.block_until_ready(compiled(params, x))                         # warm up
        fns[label] = (lambda: compiled(params, x), *_memory_bytes(compiled))

    def add(label, module, variables):
        params, rest = variables["params"], {c: v for c, v in variables.items() if c != "params"}

        def loss(p, xx):
            out = module.apply({"params": p, **rest}, xx, deterministic=True)
            return jnp.sum(out.y * cot)

        add_loss(label, loss, params)
        stats = jax.jit(lambda v, xx: module.apply(v, xx).stats)(variables, x)
        loads[label] = float(jnp.max(stats.expert_load) * stats.expert_load.shape[0])

    dense = DenseLayer(k * f, kind, act, False, "float32", "float32")
    add("dense", dense, jax.jit(dense.init)(keys[2], x))
    for label in labels:
        disp = LEARNED_DISPATCH[label]
        cfg = MoEConfig(num_experts=e, hidden_dim=f, expert_kind=kind, activation=act, use_bias=False,
                        router=RouterConfig(k=k, renormalize=True, steer=skew == "zipf"), dispatch=disp)
        layer = MoELayer(cfg)
        variables = dict(jax.jit(layer.init)(keys[3], x))
        if skew == "zipf":
            offsets = -ZIPF_SKEW * jnp.log1p(jnp.arange(e, dtype=jnp.float32))
            variables["moe_state"] = {"router": {"steer_offset": offsets}}
        add(label, layer, variables)
    if skew == "balanced" and (t * k) % e == 0:
        add_loss(EXPERTS_ALONE, functools.partial(_experts_alone_loss, kind=kind, act=act, k=k, cot=cot),
                 _experts_alone_params(keys[3], kind, e, d, f))
    times = {label: [] for label in fns}
    for round_ in range(rounds + 1):
        for label, (call, *_) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[label].append(time.perf_counter() - start)
        if round_ == 0:
            times = {label: [] for label in fns}
    result = {"setting": name, **s, "kind": kind, "routing": skew, "rounds": rounds, "grad_only": grad_only,
              "dense_ms": 1e3 * statistics.median(times["dense"]), "dense_peak_mib": fns["dense"][1] / 2 ** 20,
              "dense_temp_mib": fns["dense"][2] / 2 ** 20,
              "impls": {}}
    print(f"\n{name} {s} {kind} learned router, routing={skew}: dense fwd+bwd {result['dense_ms']:.1f} ms, "
          f"peak {result['dense_peak_mib']:.1f} MiB (temporaries {result['dense_temp_mib']:.1f})")
    for label in (*labels, *([EXPERTS_ALONE] if EXPERTS_ALONE in fns else [])):
        ratios = [a / b for a, b in zip(times["dense"], times[label])]
        row = {"moe_ms": 1e3 * statistics.median(times[label]), "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "peak_mib": fns[label][1] / 2 ** 20,
               "temp_mib": fns[label][2] / 2 ** 20,
               "load_max_over_mean": loads.get(label, 1.0)}
        result["impls"][label] = row
        print(f"  {label:28s} {row['moe_ms']:8.1f} ms  dense/moe {row['ratio_median']:.3f} "
              f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]  peak {row['peak_mib']:.1f} MiB "
              f"(temporaries {row['temp_mib']:.1f})  "
              f"load max/mean {row['load_max_over_mean']:.2f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--settings", default="S1,S2")
    parser.add_argument("--routings", default=None, help="default balanced,zipf (--smoke: zipf)")
    parser.add_argument("--only", default="", help="comma-separated substrings of implementation names")
    parser.add_argument("--learned", action="store_true", help="only the learned-router headline")
    parser.add_argument("--forced", action="store_true", help="only the forced-routing diagnostic")
    parser.add_argument("--kinds", default="mlp,glu", help="expert kinds of the learned-router headline")
    parser.add_argument("--layers", default=",".join(LEARNED_DISPATCH),
                        help="dispatch rows of the learned-router headline")
    parser.add_argument("--grad-only", action="store_true",
                        help="headline: gradients only, without the loss value (the definition before 2026-12-01's "
                             "second measurement; XLA then drops the dense FFN's output matmul)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and at most 2 rounds (the test suite); default --only padded_t8,blocked,"
                             "capacity_index_cf1.0")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else {n: SETTINGS[n] for n in args.settings.split(",")}
    rounds = min(2, args.rounds) if args.smoke else args.rounds
    only = [o for o in args.only.split(",") if o] or None
    if args.smoke:
        only = only or ["padded_t8", "blocked", "capacity_index_cf1.0"]
    routings = args.routings or ("zipf" if args.smoke else "balanced,zipf")
    labels = tuple(args.layers.split(","))
    unknown = [label for label in labels if label not in LEARNED_DISPATCH]
    if unknown:
        parser.error(f"--layers: unknown {unknown}; known: {', '.join(LEARNED_DISPATCH)}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    learned = [] if args.forced else [
        run_learned(name, s, kind, skew, rounds, args.grad_only, labels) for name, s in settings.items() for kind in args.kinds.split(",")
        for skew in ("balanced", "zipf")]
    results = [] if args.learned else [run_setting(name, s, skew, rounds, only) for name, s in settings.items()
                                       for skew in routings.split(",")]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "backend": jax.default_backend(), "learned": learned,
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
