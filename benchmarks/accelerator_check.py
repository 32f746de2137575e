"""Everything a lent GPU or TPU must answer, in one command (docs/accelerator.md has the bare-machine recipe).

    python benchmarks/accelerator_check.py                      # on the accelerator: ~8 minutes on one H100/H200
    python benchmarks/accelerator_check.py --smoke --out /tmp/x # tiny shapes on CPU (the test suite), < 20 s

Items, in order, each under its own time budget (and a global deadline); an item that fails or runs out of time is
recorded as such and the check goes on; results are rewritten after every item, so a crash keeps what was done:

1. ``contract``: the grouped matmul contract of ``tests/gmm_contract.py`` (values and both gradients against the
   reference; rows past all groups and empty groups' weight gradients exactly zero), in float32 (at ``highest``
   matmul precision) and bfloat16, on every ``dispatch.gmm`` backend that compiles for this device (no interpreter),
   plus tokamax with each of its implementations forced.
2. ``gmm``: grouped-matmul TFLOP/s, forward and forward+backward, bf16, for each backend against a dense bf16 GEMM of
   the same useful size (``[M, K] @ [K, N]``), at Mixtral (T=16384, K=2 of E=8, D=4096, F=14336: M=32768) and
   DeepSeek-V3 shapes (T=16384, K=8 of E=256, D=7168, F=2048: M=131072), balanced and Zipf group sizes. A backend
   whose compiled program XLA counts at more than twice the useful FLOPs (``ragged_dot`` lowered to a dense product
   over all experts) or whose temporaries exceed the device memory is reported, not run.
3. ``layer``: the MoE layer (dropless, SwiGLU experts, bf16, balanced routing) forward+backward at Mixtral shapes
   against its dense-equivalent FFN (width ``K * F``), for ``auto``'s backend, the one this check recommends and
   ``ragged_dot``.
4. ``train``: one TransformerLM train step (MoE, bf16, ``dispatch.gmm=auto``) on one device: tokens/s and MFU.

Writes ``accelerator_<platform>_<device>_<date>.json`` and ``.md`` into ``--out`` (default ``benchmarks/results``)
and prints the backend ``auto`` should pick: the fastest backend (geometric mean of dense/gmm time ratios over the
forward+backward rows) among those that passed every contract case on this device.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import pathlib
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT / "tests", ROOT / "benchmarks"):              # tests/gmm_contract.py; gmm.py and moe_layer.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
try:
    import moejax  # noqa: F401,E402 -- installed (editable or wheel): moejax.kernels is mapped from kernels/ at install
except ImportError as err:
    sys.exit(f"accelerator_check: moejax is not installed ({err}); see docs/accelerator.md")

from moejax.dispatch import backends as gmm_backends  # noqa: E402
from moejax.dispatch.backends import GMM, select_gmm  # noqa: E402
from moejax.dispatch.backends.gmm import tokamax as tokamax_backend  # noqa: E402

FULL = {"gmm": {"mixtral": (16384 * 2, 4096, 14336, 8), "deepseek_v3": (16384 * 8, 7168, 2048, 256)},
        "contract": [(37, 20, 13, 6), (1000, 384, 640, 8)],
        "layer": dict(t=16384, d=4096, f=14336, e=8, k=2),
        "train": dict(d_model=2048, num_layers=4, num_heads=16, vocab=32000, experts=8, k=2, hidden=4096,
                      seq_len=2048, batch=8, steps=5)}
SMOKE = {"gmm": {"mixtral": (64, 32, 48, 8), "deepseek_v3": (128, 32, 16, 16)},
         "contract": [(37, 20, 13, 6)],
         "layer": dict(t=64, d=32, f=48, e=8, k=2),
         "train": dict(d_model=32, num_layers=1, num_heads=2, vocab=64, experts=4, k=2, hidden=32, seq_len=16,
                       batch=4, steps=2)}
# Seconds per item (full run); the global deadline (--budget) can cut any of them shorter. Budgets are checked
# between compilations and timed calls, so an item can overrun by one of them: 420 s leaves a minute of the 8.
BUDGETS = {"contract": 100.0, "gmm": 190.0, "layer": 60.0, "train": 70.0}


# ----------------------------------------------------------------------------- bookkeeping


class Check:
    """The run's results, rewritten to JSON and markdown after every item."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        device = jax.devices()[0]
        self.platform = gmm_backends.current_platform()
        self.data: dict[str, Any] = {
            "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "jax": jax.__version__, "jaxlib": package_version("jaxlib"),
            "platform": self.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
            "tokamax": tokamax_version(), "smoke": bool(args.smoke),
            "auto_now": GMM.resolve(args.auto_name, self.platform).name, "items": {}}
        slug = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
        stem = f"accelerator_{self.platform}_{slug}_{datetime.date.today().isoformat()}"
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = self.out / f"{stem}.json", self.out / f"{stem}.md"

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, fn: Callable[[float], Any]) -> None:
        """Runs item ``name`` with ``fn(deadline)``; records its rows, status, seconds and any error."""
        budget = self.left() if self.args.smoke else min(BUDGETS[name], self.left())
        item: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "rows": []}
        self.data["items"][name] = item
        if budget <= 5:
            item["error"] = "skipped: the global time budget is spent"
            self.save()
            return
        print(f"\n== {name} (budget {budget:.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            item["rows"] = fn(start + budget)
            item["status"] = "ok"
        except Exception as err:                 # noqa: BLE001 -- a failing item is recorded, the check goes on
            item["status"], item["error"] = "failed", one_line(err)
            traceback.print_exc()
        item["seconds"] = round(time.perf_counter() - start, 1)
        gc.collect()
        self.save()

    def save(self) -> None:
        self.data["recommended_auto"] = recommend(self.data["items"])
        self.json_path.write_text(json.dumps(self.data, indent=1, default=str))
        self.md_path.write_text(markdown(self.data))


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def commit() -> str:
    """The checkout's commit read from ``.git`` (no git binary needed), or ``MOEJAX_COMMIT``, or ``unknown``."""
    import os
    if os.environ.get("MOEJAX_COMMIT"):
        return os.environ["MOEJAX_COMMIT"]
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = ROOT / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()
            packed = (ROOT / ".git" / "packed-refs").read_text().splitlines()
            return next(line.split()[0] for line in packed if line.endswith(head[5:]))
        return head
    except (OSError, StopIteration):
        return "unknown"


def package_version(name: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tokamax_version() -> str:
    if not tokamax_backend.available():
        return f"not importable ({tokamax_backend.import_error()})"
    import tokamax
    return tokamax.__version__


def timed(fn: Callable[[], Any], reps: int, deadline: float) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` (after one warm-up call), fewer if ``deadline`` comes first."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return times


def candidates(platform: str, tile: int, extra_tiles: tuple[int, ...] = ()) -> dict[str, Callable[..., jax.Array]]:
    """Every backend that compiles for ``platform`` (bound at row tile ``tile``), the platform's Pallas kernel at
    each of ``extra_tiles`` (``name@tile``), and tokamax per forced implementation (``tokamax:impl``)."""
    out = {}
    for name, backend in sorted(GMM.backends.items()):
        if backend.supports(platform) and not backend.interpreted(platform) and not name.startswith("test_"):
            out[name] = backend.bind(platform, tile)
    pallas = GMM.resolve("pallas", platform) if GMM.candidates("pallas", platform) else None
    if pallas is not None and pallas.name in out:
        out.update({f"{pallas.name}@{t}": pallas.bind(platform, t) for t in extra_tiles if t != tile})
    if tokamax_backend.available() and platform in ("gpu", "tpu"):
        for impl in (("mosaic", "triton") if platform == "gpu" else ("mosaic",)):
            out[f"tokamax:{impl}"] = functools.partial(tokamax_backend.gmm_tokamax, implementation=impl)
    return out


def ordered(names: list[str], auto: str) -> list[str]:
    """auto's pick first, then tokamax variants, ragged_dot, the Pallas kernels, the rest; reference last."""
    rank = {auto: 0, "ragged_dot": 2, "pallas_triton": 3, "pallas_mosaic": 3, "reference": 9}
    return sorted(names, key=lambda n: (rank.get(n, 1 if n.startswith("tokamax") else 4 if "@" in n else 5), n))


# ----------------------------------------------------------------------------- 1. contract


def check_contract(check: Check, deadline: float) -> list[dict]:
    import gmm_contract                       # tests/gmm_contract.py (needs pytest and hypothesis installed)
    rows = []
    fns = candidates(check.platform, check.args.tile, check.args.extra_tiles)
    names = ordered(list(fns), check.data["auto_now"])
    if check.args.backends:
        names = [n for n in names if n in check.args.backends.split(",")]
    with jax.default_matmul_precision("highest"):
        for name in names:
            for shape in check.args.sizes["contract"]:
                kernel = jax.jit(functools.partial(gmm_contract.value_and_grads, fns[name]))
                m, k, n, e = shape
                cases = dict(gmm_contract.named_sizes(m, e))
                rng = np.random.default_rng(m)
                cases["random"] = list(rng.multinomial(m - m // 5, np.ones(e) / e))     # 20% of rows past groups
                for dtype in (jnp.float32, jnp.bfloat16):
                    if time.perf_counter() > deadline:
                        rows.append({"backend": name, "shape": shape, "dtype": jnp.dtype(dtype).name,
                                     "ok": None, "error": "skipped: item budget spent"})
                        continue
                    scale = math.sqrt(max(k, m / e) / 20)        # bf16 rounding grows with the summed terms
                    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=0.1 * scale)
                    failed = []
                    start = time.perf_counter()
                    for case, sizes in cases.items():
                        try:
                            gmm_contract.check_gmm(kernel, shape, [int(s) for s in sizes], 7, dtype, tol)
                        except Exception as err:      # noqa: BLE001
                            failed.append(f"{case}: {one_line(err, 200)}")
                    row = {"backend": name, "shape": shape, "dtype": jnp.dtype(dtype).name, "ok": not failed,
                           "cases": len(cases), "seconds": round(time.perf_counter() - start, 2)}
                    if failed:
                        row["error"] = failed[0] + (f" (+{len(failed) - 1} more cases)" if len(failed) > 1 else "")
                    print(f"  {name:16s} {str(shape):22s} {row['dtype']:9s} {'ok' if row['ok'] else 'FAILED'} "
                          f"{row.get('error', '')}", flush=True)
                    rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. grouped matmul TFLOP/s


def check_gmm(check: Check, deadline: float) -> list[dict]:
    """Backend by backend (most important first, so that the item budget cuts the least interesting), each at every
    shape and mode against that shape's and mode's dense GEMM, timed once up front."""
    from gmm import group_sizes                     # benchmarks/gmm.py: balanced and Zipf sizes summing to M
    fns = candidates(check.platform, check.args.tile, check.args.extra_tiles)
    names = [n for n in ordered(list(fns), check.data["auto_now"]) if n != "reference"]
    if check.args.backends:
        names = [n for n in names if n in check.args.backends.split(",")]
    mem = device_memory()
    setups, rows = [], []
    for shape_name, (m, k, n, e) in check.args.sizes["gmm"].items():
        keys = jax.random.split(jax.random.key(0), 3)
        lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        rhs = jax.random.normal(keys[1], (e, k, n), jnp.bfloat16) / math.sqrt(k)
        cot = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
        # The dense GEMM has its own [K, N] weight: a slice of rhs would make its gradient an [E, K, N] scatter.
        data = dict(lhs=lhs, rhs=rhs, dense_w=rhs[0], sizes={s: group_sizes(m, e, s) for s in ("balanced", "zipf")})
        for mode in check.args.modes:
            useful = 2.0 * m * k * n * (1 if mode == "fwd" else 3)
            program = functools.partial(_program, mode, cot)
            dense = program(lambda a, w, g: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(a.dtype))
            dense_s = statistics.median(timed(lambda: dense(lhs, data["dense_w"], data["sizes"]["balanced"]),
                                              check.args.reps, deadline))
            print(f"  {shape_name} {mode} M={m} K={k} N={n} E={e}: dense bf16 {1e3 * dense_s:.2f} ms, "
                  f"{useful / dense_s / 1e12:.1f} TFLOP/s", flush=True)
            setups.append((shape_name, mode, useful, dense_s, program, data))
    for name in names:
        for shape_name, mode, useful, dense_s, program, data in setups:
            base = {"shape": shape_name, "mode": mode, "backend": name, "dense_ms": 1e3 * dense_s,
                    "dense_tflops": useful / dense_s / 1e12}
            compiled, info = None, {}
            if time.perf_counter() > deadline:
                info["error"] = "skipped: item budget spent"
            else:
                try:
                    compiled, info = compile_guarded(program(fns[name]),
                                                     (data["lhs"], data["rhs"], data["sizes"]["balanced"]), useful, mem)
                except Exception as err:              # noqa: BLE001
                    info["error"] = one_line(err)
            for skew, gs in data["sizes"].items():
                row = {**base, "skew": skew, **info}
                rows.append(row)
                if compiled is not None and time.perf_counter() < deadline:
                    try:
                        times = timed(lambda: compiled(data["lhs"], data["rhs"], gs), check.args.reps, deadline)
                        row.update(ms=1e3 * statistics.median(times), reps=len(times),
                                   tflops=useful / statistics.median(times) / 1e12)
                        row["ratio"] = row["tflops"] / row["dense_tflops"]
                    except Exception as err:          # noqa: BLE001
                        row["error"] = one_line(err)
                elif compiled is not None:
                    row["error"] = "skipped: item budget spent"
                shown = (f"{row['ms']:9.2f} ms {row['tflops']:8.1f} TFLOP/s  gmm/dense {row['ratio']:.3f}"
                         if "ms" in row else row.get("error", ""))
                print(f"  {name:17s} {shape_name:11s} {mode:7s} {skew:8s} {shown}", flush=True)
    return rows


def _program(mode: str, cot: jax.Array, f: Callable) -> Callable:
    """``f(lhs, rhs, group_sizes)`` jitted: its output (``fwd``) or both operands' gradients (``fwd_bwd``)."""
    if mode == "fwd":
        return jax.jit(f)
    return jax.jit(jax.grad(lambda a, b, g: jnp.sum((f(a, b, g) * cot).astype(jnp.float32)), argnums=(0, 1)))


def device_memory() -> float | None:
    try:
        return float(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:                               # noqa: BLE001 -- CPU and some runtimes have no stats
        return None


def compile_guarded(fn, args: tuple, useful: float, mem: float | None) -> tuple[Any, dict]:
    """(the compiled ``fn``, facts), or (None, facts with ``error``) for a program XLA counts at more than twice the
    useful FLOPs (a dense or padded lowering) or whose temporaries would not fit the device."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    info: dict[str, Any] = {"compile_s": round(time.perf_counter() - t, 2)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    info["xla_flops_ratio"] = round(xla_flops / useful, 3)
    if xla_flops > 2 * useful:
        info["error"] = f"not run: XLA counts {xla_flops / useful:.1f}x the useful FLOPs (dense or padded work)"
        return None, info
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0
    if mem is not None and temp > 0.8 * mem:
        info["error"] = f"not run: {temp / 2**30:.1f} GiB of temporaries on a {mem / 2**30:.0f} GiB device"
        return None, info
    return compiled, info


# ----------------------------------------------------------------------------- 3. MoE layer vs dense FFN


def check_layer(check: Check, deadline: float) -> list[dict]:
    from moe_layer import forced_routing               # benchmarks/moe_layer.py
    from moejax import dispatch
    from moejax.experts.ffn import Dense, ffn
    s = check.args.sizes["layer"]
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    keys = jax.random.split(jax.random.key(1), 8)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    cot = jax.random.normal(keys[1], (t, d), jnp.bfloat16)
    routing = forced_routing(t, e, k, "balanced")

    def init(key, shape, fan_in):
        return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(jnp.bfloat16)

    moe_params = {"w_gate": init(keys[2], (e, d, f), d), "w_up": init(keys[3], (e, d, f), d),
                  "w_down": init(keys[4], (e, f, d), f)}
    dense_params = {"w_gate": init(keys[5], (d, k * f), d), "w_up": init(keys[6], (d, k * f), d),
                    "w_down": init(keys[7], (k * f, d), k * f)}

    def moe_loss(gmm_fn, fused):
        def loss(params, xs):
            expert_fn = lambda h, grouping: ffn(params, h, grouping, kind="glu", activation="silu")  # noqa: E731
            y, _ = dispatch.apply(xs, routing, expert_fn, mode="dropless", grouped_matmul=gmm_fn, fused_ffn=fused)
            return jnp.sum((y * cot).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    dense = jax.jit(jax.grad(lambda p, xs: jnp.sum((ffn(p, xs, Dense(), kind="glu", activation="silu") * cot)
                                                   .astype(jnp.float32)), argnums=(0, 1)))
    dense_s = statistics.median(timed(lambda: dense(dense_params, x), check.args.reps, deadline))
    useful = 3 * 3 * 2.0 * t * k * d * f                    # 3 products, forward + 2 backward each
    print(f"  T={t} D={d} F={f} E={e} K={k}: dense FFN (width {k * f}) fwd+bwd {1e3 * dense_s:.2f} ms", flush=True)
    picks = [check.data["auto_now"], check.data.get("recommended_auto", {}).get("backend"), "ragged_dot"]
    rows = []
    for name in dict.fromkeys(p for p in picks if p):
        row = {"backend": name, "dense_ms": 1e3 * dense_s, "dense_tflops": useful / dense_s / 1e12}
        rows.append(row)
        if time.perf_counter() > deadline:
            row["error"] = "skipped: item budget spent"
            continue
        try:
            backend = select_gmm(name, check.platform)
            tile = check.args.tile
            fn = moe_loss(backend.bind(check.platform, tile), backend.bind_fused(check.platform, tile))
            times = timed(lambda: fn(moe_params, x), check.args.reps, deadline)
            row.update(ms=1e3 * statistics.median(times), tflops=useful / statistics.median(times) / 1e12)
            row["ratio"] = dense_s / statistics.median(times)
        except Exception as err:                      # noqa: BLE001
            row["error"] = one_line(err)
        shown = f"{row['ms']:9.2f} ms  moe/dense speed {row['ratio']:.3f}" if "ms" in row else row.get("error", "")
        print(f"    {name:16s} {shown}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 4. one train step's MFU


def check_train(check: Check, deadline: float) -> list[dict]:
    import optax
    from moejax.config import DispatchConfig, MoEConfig
    from moejax.models.config import LMConfig
    from moejax.models.transformer import TransformerLM
    from moejax.routing.config import RouterConfig
    from moejax.training.loop import init_state
    from moejax.training.steps import make_train_step
    from moejax.training.throughput import Throughput, Window
    s = check.args.sizes["train"]
    moe = MoEConfig(num_experts=s["experts"], hidden_dim=s["hidden"], expert_kind="glu", activation="silu",
                    use_bias=False, router=RouterConfig.from_dict({"k": s["k"]}), dtype="bfloat16",
                    dispatch=DispatchConfig(mode="dropless", gmm=check.args.auto_name))
    cfg = LMConfig(vocab_size=s["vocab"], d_model=s["d_model"], num_layers=s["num_layers"], num_heads=s["num_heads"],
                   moe=moe, ffn_kind="glu", activation="silu", use_bias=False, norm="rmsnorm", dtype="bfloat16")
    model = TransformerLM(cfg)
    tx = optax.adamw(1e-4)
    example = jnp.zeros((s["batch"], s["seq_len"]), jnp.int32)
    state, _ = init_state(model, tx, example, 0)
    step = jax.jit(make_train_step(model, tx, "lm"), donate_argnums=(0,))
    tokens = jax.random.randint(jax.random.key(2), (s["batch"], s["seq_len"] + 1), 0, s["vocab"], jnp.int32)
    t = time.perf_counter()
    state, metrics = step(state, {"tokens": tokens})
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    window = Window()
    for _ in range(s["steps"]):
        state, metrics = step(state, {"tokens": tokens})
        jax.block_until_ready(metrics)
        window.add(s["batch"], s["batch"] * s["seq_len"])
        if time.perf_counter() > deadline:
            break
    rates = Throughput(cfg, example.shape, num_devices=1).record(window, metrics.get("experts_per_token"))
    row = {"config": {**s, "gmm": check.args.auto_name, "gmm_resolved": check.data["auto_now"]},
           "first_step_s": round(compile_s, 2), "steps": window.examples // s["batch"], **rates,
           "achieved_tflops_per_device": rates.get("train_flops_per_token", 0.0) * rates["tokens_per_sec"] / 1e12}
    mfu = f"MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "MFU unknown (no peak for this device)"
    print(f"  {row['tokens_per_sec']:.0f} tokens/s, {row['achieved_tflops_per_device']:.1f} model TFLOP/s per "
          f"device, {mfu}", flush=True)
    return [row]


# ----------------------------------------------------------------------------- recommendation and report


def recommend(items: dict) -> dict:
    """The fastest plain backend (geometric mean of gmm/dense over forward+backward rows) that passed every contract
    case here; tokamax variants (``tokamax:impl``) and tile variants (``name@tile``: set ``dispatch.gmm_tile``) are
    reported, but are not ``dispatch.gmm`` names."""
    contract = items.get("contract", {}).get("rows", [])
    passed = {r["backend"] for r in contract} - {r["backend"] for r in contract if r.get("ok") is not True}
    speed: dict[str, list[float]] = {}
    for r in items.get("gmm", {}).get("rows", []):
        if r["mode"] == "fwd_bwd" and "ratio" in r:
            speed.setdefault(r["backend"], []).append(r["ratio"])
    scores = {n: math.exp(statistics.mean(map(math.log, v))) for n, v in speed.items() if v}
    eligible = {n: v for n, v in scores.items() if n in passed and ":" not in n and "@" not in n}
    if not eligible:
        return {"backend": None, "why": "no backend both passed the contract and was timed here"}
    best = max(eligible, key=eligible.get)
    return {"backend": best, "gmm_over_dense_geomean": round(eligible[best], 3),
            "scores": {n: round(v, 3) for n, v in sorted(scores.items(), key=lambda kv: -kv[1])},
            "passed_contract": sorted(passed)}


def markdown(data: dict) -> str:
    lines = [f"# Accelerator check: {data['device_kind']} ({data['platform']}), {data['date']}", "",
             f"`{data['command']}`; commit `{data['commit']}`, jax {data['jax']}, tokamax {data['tokamax']}, "
             f"{data['num_devices']} device(s). `dispatch.gmm=auto` resolves to `{data['auto_now']}`; this check "
             f"recommends `{data['recommended_auto'].get('backend')}`.", ""]
    for name, item in data["items"].items():
        lines += [f"## {name}: {item['status']} ({item['seconds']} s)", ""]
        if item.get("error"):
            lines += [f"Error: `{item['error']}`", ""]
        rows = item.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(c for r in rows for c in r if not isinstance(r[c], dict)))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
            lines.append("")
    lines += ["## Recommendation", "", "```", json.dumps(data["recommended_auto"], indent=1), "```", ""]
    return "\n".join(lines)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, the test suite); needs --out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for JSON + markdown")
    parser.add_argument("--only", default="contract,gmm,layer,train", help="comma-separated items, in this order")
    parser.add_argument("--backends", default="", help="restrict contract/gmm to these dispatch.gmm names")
    parser.add_argument("--budget", type=float, default=420.0, help="global deadline in seconds")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement (after a warm-up)")
    parser.add_argument("--auto-name", default="auto", help="the dispatch.gmm name the layer/train items use")
    parser.add_argument("--tile", type=int, default=None, help="dispatch.gmm_tile for the backends that take one "
                                                                "(default 128; --smoke: 8)")
    parser.add_argument("--tiles", default="64,256", help="more row tiles for the platform's Pallas kernel (tuning; "
                                                          "'' for none; --smoke: none)")
    args = parser.parse_args(argv)
    if args.smoke and pathlib.Path(args.out).resolve() == (ROOT / "benchmarks" / "results").resolve():
        parser.error("--smoke writes into the directory given by --out, not benchmarks/results")
    args.sizes = SMOKE if args.smoke else FULL
    args.modes = ("fwd_bwd",) if args.smoke else ("fwd", "fwd_bwd")
    args.tile = args.tile or (8 if args.smoke else 128)
    args.extra_tiles = () if args.smoke else tuple(int(t) for t in args.tiles.split(",") if t)
    if args.smoke:
        args.reps = min(args.reps, 2)
    check = Check(args)
    if args.smoke and not args.backends:          # the code paths, not every backend: auto's and ragged_dot
        args.backends = f"{check.data['auto_now']},ragged_dot"
    print(f"moejax accelerator check: {check.data['device_kind']} x {check.data['num_devices']} "
          f"({check.platform}), jax {jax.__version__}, tokamax {check.data['tokamax']}, "
          f"auto -> {check.data['auto_now']}", flush=True)
    items = {"contract": check_contract, "gmm": check_gmm, "layer": check_layer, "train": check_train}
    for name in args.only.split(","):
        check.run(name, functools.partial(items[name], check))
    pick = check.data["recommended_auto"]
    print(f"\nauto should pick: {pick.get('backend')} (now: {check.data['auto_now']}); "
          f"{pick.get('why', pick.get('scores'))}", flush=True)
    print(f"results: {check.json_path} and {check.md_path}", flush=True)
    return check.data


if __name__ == "__main__":
    main()
