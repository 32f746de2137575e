"""The learned-router MoE layer in PyTorch, timed the way ``benchmarks/moe_layer.py --learned`` times moejax's.

A side-by-side reference, not part of the test suite: PyTorch is not a moejax dependency. Run it in an environment
that has ``torch`` (>= 2.8, for ``torch._grouped_mm`` on CPU):

    python benchmarks/torch_moe_layer.py [--rounds 7] [--settings S1,S2] [--json PATH]

Per setting and routing (``balanced``: the router as initialised; ``zipf``: router-logit offsets
``-0.5 * log(i + 1)``, as in moejax's benchmark), the MoE layer is: linear router, softmax, top-k, weights
renormalised over the k chosen (router kernel initialised N(0, 0.02^2), as moejax's), token copies sorted by
expert, SwiGLU experts through ``torch._grouped_mm`` (the grouped matmul transformers' MoE models use on CPU),
weighted scatter-add back to tokens. Its forward+backward (loss ``sum(y * cot)``, gradients into x and every
parameter, router included) is timed interleaved with a dense
SwiGLU FFN of width ``K * F`` (the same active FLOPs), round after round, fp32, the default thread count.
Printed: ``dense_time / moe_time`` (median and min-max over rounds; > 1: the MoE is faster). Like the moejax
benchmark's headline, the layer's output is computed in both (eager PyTorch always runs the forward).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

SETTINGS = {"S1": dict(t=2048, d=512, f=1024, e=8, k=2), "S2": dict(t=1024, d=512, f=256, e=64, k=8)}
ZIPF_SKEW = 0.5


def _param(*shape: int, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).requires_grad_()


def moe_forward(x, w_router, offsets, w_gate, w_up, w_down, k: int) -> torch.Tensor:
    """x [T, D] -> [T, D]: top-k softmax router (renormalised), grouped SwiGLU experts, weighted combine."""
    probs = torch.softmax(x @ w_router + offsets, dim=-1)
    weight, index = torch.topk(probs, k, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    ends = torch.cumsum(torch.bincount(flat, minlength=w_gate.shape[0]), 0).to(torch.int32)
    rows = x[token]
    hidden = F.silu(torch._grouped_mm(rows, w_gate, offs=ends)) * torch._grouped_mm(rows, w_up, offs=ends)
    out = torch._grouped_mm(hidden, w_down, offs=ends) * weight.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, out)


def dense_forward(x, w_gate, w_up, w_down) -> torch.Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def run(name: str, s: dict, skew: str, rounds: int) -> dict:
    t, d, f, e, k = s["t"], s["d"], s["f"], s["e"], s["k"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, d, generator=gen).requires_grad_()
    cot = torch.randn(t, d, generator=gen)
    router = (0.02 * torch.randn(d, e, generator=gen)).requires_grad_()   # moejax's router init, N(0, 0.02^2)
    moe = [router, _param(e, d, f, fan_in=d, gen=gen), _param(e, d, f, fan_in=d, gen=gen),
           _param(e, f, d, fan_in=f, gen=gen)]
    dense = [_param(d, k * f, fan_in=d, gen=gen), _param(d, k * f, fan_in=d, gen=gen),
             _param(k * f, d, fan_in=k * f, gen=gen)]
    offsets = (-ZIPF_SKEW * torch.log1p(torch.arange(e, dtype=torch.float32)) if skew == "zipf"
               else torch.zeros(e))

    def step_moe():
        (moe_forward(x, moe[0], offsets, *moe[1:], k) * cot).sum().backward()

    def step_dense():
        (dense_forward(x, *dense) * cot).sum().backward()

    with torch.no_grad():
        index = torch.topk(torch.softmax(x @ moe[0] + offsets, -1), k, -1).indices
        load = torch.bincount(index.reshape(-1), minlength=e).float()
    times = {"dense": [], "moe": []}
    for round_ in range(rounds + 1):
        for label, fn in (("dense", step_dense), ("moe", step_moe)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
        if round_ == 0:
            times = {"dense": [], "moe": []}
    ratios = [a / b for a, b in zip(times["dense"], times["moe"])]
    row = {"setting": name, **s, "kind": "glu", "routing": skew, "rounds": rounds,
           "dense_ms": 1e3 * statistics.median(times["dense"]), "moe_ms": 1e3 * statistics.median(times["moe"]),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "load_max_over_mean": float(load.max() / load.mean())}
    print(f"{name} {s} glu routing={skew}: torch grouped_mm {row['moe_ms']:.1f} ms, dense {row['dense_ms']:.1f} ms, "
          f"dense/moe {row['ratio_median']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}], "
          f"load max/mean {row['load_max_over_mean']:.2f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--settings", default="S1,S2")
    parser.add_argument("--routings", default="balanced,zipf")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = [run(name, SETTINGS[name], skew, args.rounds) for name in args.settings.split(",")
            for skew in args.routings.split(",")]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
