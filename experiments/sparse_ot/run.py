"""Sparsity-constrained OT: part A (the solver on synthetic problems) and part B (the router in a byte LM).

nice -n 15 python experiments/sparse_ot/run.py --preset=full --threads=1 [--parts=A,B] [--variants=...] [--seeds=...]
python experiments/sparse_ot/run.py --preset=full --table        # tables and verdicts of the results on disk

Part A writes ``solver_<family>_<method>_k<k>.json`` (one per family, solver and k, all instances inside); part B
trains every (variant, seed) with the library's trainer and writes ``<variant>_seed<seed>.json``. Files that exist
are skipped, so a killed sweep continues where it stopped. ``--preset=full`` refuses a tree with uncommitted
changes (PROTOCOL.md, "Provenance"); ``--preset=pilot`` writes to ``pilot/``.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Sequence

# This checkout's moejax, not whichever one an editable install points to (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

# Every threshold of the decision rules (README.md, "Decision rules"), named once.
LIMIT_TV = 1e-3            # a plan "recovers" a reference when its TV distance to it is at most this
LIMIT_VALUE = 1e-3         # ... and (k = 1) the relative value gap is at most this
REPRODUCED_SHARE = 0.95    # of the instances, for "reproduced"
PARTLY_SHARE = 0.80        # of the instances, for "partly"
UNIQUE_GAP = 1e-6          # k = 1: an instance counts only when its optimal permutation is unique by this margin
NONTRIVIAL_TV = 0.01       # the controls: the regularisation / the constraint changes the plan by at least this
PAIR_SHARE = 0.80          # convergence: share of instances where each larger k is at least as good
ENDS_SHARE = 0.90          # convergence: share of instances where k_max is strictly better than k_min
ENDS_RATIO = 10.0          # ... by at least this factor in the geometric mean
CONVERGED_SHARE = 0.90     # control: the solver converges at k_max in at least this share of instances
MIN_ITERATIONS = 5         # control: the k_max problem is not trivial (median iterations)
MARGIN = 0.02              # part B: non-inferiority margin in nats/byte
PRIMARY_FAMILY = "square"  # part A's convergence claim is decided on this family with the 'agd' solver


def parse(argv: list[str] | None = None):
    p = sweep.parser("sparse_ot", __doc__.splitlines()[0], compile_cache=True)
    p.add_argument("--parts", default="A,B", help="A (solver study), B (router in a byte LM), or both")
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "sparse_ot", name)


# ----------------------------------------------------------------------------------------------- part A


def solver_name(family: str, method: str, k: int) -> str:
    return f"solver_{family}_{method}_k{k}.json"


def run_part_a(args, config_lib, results: pathlib.Path, command: str) -> list[dict]:
    import jax
    synthetic = load_sibling("synthetic")
    s = config_lib.SOLVER[args.preset]
    seeds = list(range(s["instances"]))
    host, code = sweep.machine(), sweep.code_version()
    records = []
    for family in s["families"]:
        refs = None
        methods = ("agd", "lbfgs") if s["lbfgs"] and family == PRIMARY_FAMILY else ("agd",)
        for method in methods:
            for k in s.get("k_grid", config_lib.K_GRID)[family]:
                out = results / solver_name(family, method, k)
                if out.exists():
                    records.append(json.loads(out.read_text()))
                    continue
                if refs is None:
                    refs = synthetic.references(family, seeds)
                start = time.perf_counter()
                rec = synthetic.run_family(family, seeds, k, method=method, max_iter=s["max_iter"], tol=s["tol"],
                                           budget=s["budget"], long=s["long"], refs=refs)
                rec.update(experiment="sparse_ot", part="A", preset=args.preset, jax_version=jax.__version__,
                           machine=host, code=code, command=command, settings=s,
                           wall_clock_s=time.perf_counter() - start)
                out.write_text(json.dumps(rec, indent=1))
                print(f"A {family} {method} k={k}: median iterations {_median(rec['iterations'])}, median error "
                      f"after {s['budget']} {_median(rec['error_at_budget']):.2e} ({rec['wall_clock_s']:.0f} s)",
                      flush=True)
                records.append(rec)
    return records


def _median(v: Sequence[float]) -> float:
    import numpy as np
    return float(np.median(np.asarray(v, float)))


def load_part_a(results: pathlib.Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(results.glob("solver_*.json"))]


# ------------------------------------------------------------------------------------- part A: the rules


def share(flags: Sequence[bool]) -> float:
    return float(sum(bool(f) for f in flags)) / max(len(flags), 1)


def grade(s: float) -> str:
    return "reproduced" if s >= REPRODUCED_SHARE else "partly" if s >= PARTLY_SHARE else "not reproduced"


def k1_verdict(rec_k1: dict | None, rec_kmax: dict | None) -> dict[str, Any]:
    """Claim A1a ("unregularized OT (recovered in the limit case k=1)"), family ``assign``: among instances with a
    unique optimal permutation, the share where the k = 1 plan is within ``LIMIT_TV`` of it and the semi-dual value
    (minus its constant) within ``LIMIT_VALUE`` of the OT value. Controls: at most 20% of instances excluded as
    non-unique; the quadratic plan (k = M) is at least ``NONTRIVIAL_TV`` away from the permutation (median)."""
    if rec_k1 is None or rec_kmax is None:
        return {"verdict": "not run"}
    unique = [g > UNIQUE_GAP for g in rec_k1["second_best_gap"]]
    ok = [u and tv <= LIMIT_TV and vg <= LIMIT_VALUE
          for u, tv, vg in zip(unique, rec_k1["tv_to_assignment"], rec_k1["value_gap"])]
    nontrivial = _median(rec_kmax["tv_to_assignment"])
    controls = {"unique_share": share(unique), "quadratic_vs_assignment_tv_median": nontrivial}
    if share(unique) < 0.8 or nontrivial < NONTRIVIAL_TV:
        return {"verdict": "not testable here", "controls": controls}
    s = sum(ok) / max(sum(unique), 1)
    return {"verdict": grade(s), "share": s, "instances": sum(unique), "controls": controls,
            "why": f"k=1 plan = optimal permutation (TV <= {LIMIT_TV}) and value gap <= {LIMIT_VALUE} in "
                   f"{sum(ok)}/{sum(unique)} instances with a unique optimum"}


def large_k_verdict(rec_kmax: dict | None, rec_kmin: dict | None) -> dict[str, Any]:
    """Claim A1b ("quadratically-regularized OT (recovered when k is large enough)"), family ``square`` with
    k = M: share of instances whose plan is within ``LIMIT_TV`` of the independent quadratic plan. Controls: the
    solver converged at k = M in at least ``CONVERGED_SHARE``; the smallest k's plan is at least ``NONTRIVIAL_TV``
    away from the quadratic plan (median: the cardinality constraint does change the plan)."""
    if rec_kmax is None or rec_kmin is None:
        return {"verdict": "not run"}
    controls = {"converged_share": share(rec_kmax["converged"]),
                "kmin_vs_quadratic_tv_median": _median(rec_kmin["tv_to_quadratic"])}
    if controls["converged_share"] < CONVERGED_SHARE or controls["kmin_vs_quadratic_tv_median"] < NONTRIVIAL_TV:
        return {"verdict": "not testable here", "controls": controls}
    s = share([tv <= LIMIT_TV for tv in rec_kmax["tv_to_quadratic"]])
    return {"verdict": grade(s), "share": s, "controls": controls,
            "why": f"k=M plan within TV {LIMIT_TV} of the quadratic plan in {s:.0%} of instances"}


def convergence_verdict(by_k: dict[int, dict], stat: str = "error_at_budget") -> dict[str, Any]:
    """Claim A2 ("The smoothness of the objectives increases as k increases, giving rise to a trade-off between
    convergence speed and sparsity"): per instance (paired across k), ``stat`` (lower = closer to converged after the
    same budget) must not increase from each k to the next in at least ``PAIR_SHARE`` of the instances, for the
    consecutive pairs below the first k whose plan equals the quadratic plan (median TV <= LIMIT_TV; above it the
    problems are identical); and k_max must beat k_min strictly in at least ``ENDS_SHARE`` of the instances with a
    geometric-mean ratio of at least ``ENDS_RATIO``. Reproduced: both; partly: the end-to-end part only.
    Controls: k_max converges in ``CONVERGED_SHARE`` of the instances, its median iteration count is at least
    ``MIN_ITERATIONS``, and the k_min plan is ``NONTRIVIAL_TV`` away from the quadratic plan (when measured)."""
    import numpy as np
    ks = sorted(by_k)
    if len(ks) < 2:
        return {"verdict": "not run"}
    lo, hi = by_k[ks[0]], by_k[ks[-1]]
    controls = {"kmax_converged_share": share(hi["converged"]), "kmax_median_iterations": _median(hi["iterations"])}
    if "tv_to_quadratic" in lo:
        controls["kmin_vs_quadratic_tv_median"] = _median(lo["tv_to_quadratic"])
    if controls["kmax_converged_share"] < CONVERGED_SHARE or controls["kmax_median_iterations"] < MIN_ITERATIONS \
            or controls.get("kmin_vs_quadratic_tv_median", 1.0) < NONTRIVIAL_TV:
        return {"verdict": "not testable here", "controls": controls}
    active = [k for k in ks if "tv_to_quadratic" not in by_k[k] or _median(by_k[k]["tv_to_quadratic"]) > LIMIT_TV]
    stop = ks.index(active[-1]) + 1 if active else 0           # pairs (k_j, k_j+1) with k_j still active
    pairs = {}
    for j in range(min(stop, len(ks) - 1)):
        a, b = np.asarray(by_k[ks[j]][stat], float), np.asarray(by_k[ks[j + 1]][stat], float)
        pairs[f"{ks[j]}->{ks[j + 1]}"] = share(b <= a + 1e-12)
    a, b = np.asarray(lo[stat], float), np.asarray(hi[stat], float)
    floor = 1e-12
    ratio = float(np.exp(np.mean(np.log(np.maximum(a, floor) / np.maximum(b, floor)))))
    ends = share(b < a) >= ENDS_SHARE and ratio >= ENDS_RATIO
    monotone = all(v >= PAIR_SHARE for v in pairs.values())
    verdict = "reproduced" if ends and monotone else "partly" if ends else "not reproduced"
    return {"verdict": verdict, "stat": stat, "pairs_share": pairs, "ends_share": share(b < a),
            "ends_geomean_ratio": ratio, "controls": controls,
            "why": f"{stat}: k={ks[0]} vs k={ks[-1]} better at k_max in {share(b < a):.0%} of instances "
                   f"(geometric-mean ratio {ratio:.3g}); consecutive pairs {pairs}"}


def summarize_a(records: list[dict]) -> dict[str, Any]:
    """Per (family, method, k): medians and quartiles of every measurement; the verdicts of claims A1a, A1b, A2."""
    import numpy as np
    cells: dict[str, Any] = {}
    idx: dict[tuple[str, str], dict[int, dict]] = {}
    for r in sorted(records, key=lambda r: (r["family"], r["method"], r["k"])):
        idx.setdefault((r["family"], r["method"]), {})[r["k"]] = r
        key = f"{r['family']}/{r['method']}/k{r['k']}"
        cells[key] = {"instances": len(r["seeds"]), "converged_share": share(r["converged"]),
                      "wall_clock_s": r.get("wall_clock_s")}
        for m in ("iterations", "error_at_budget", "suboptimality_at_budget", "nnz_per_column", "smoothness",
                  "tv_to_quadratic", "tv_to_assignment", "value_gap"):
            if m in r:
                q = np.percentile(np.asarray(r[m], float), [25, 50, 75])
                cells[key][m] = {"q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
    assign, square = idx.get(("assign", "agd"), {}), idx.get(("square", "agd"), {})
    verdicts = {
        "A1a_k1_unregularized": k1_verdict(assign.get(1), assign.get(max(assign)) if assign else None),
        "A1b_large_k_quadratic": large_k_verdict(square.get(max(square)) if square else None,
                                                 square.get(min(square)) if square else None),
        "A2_convergence_primary": convergence_verdict(square, "error_at_budget"),
        "A2_secondary_square_iterations": convergence_verdict(square, "iterations"),
        "A2_secondary_square_suboptimality": convergence_verdict(square, "suboptimality_at_budget"),
        "A2_secondary_square_lbfgs": convergence_verdict(idx.get(("square", "lbfgs"), {}), "error_at_budget"),
        "A2_secondary_moe": convergence_verdict(idx.get(("moe", "agd"), {}), "error_at_budget"),
    }
    return {"cells": cells, "verdicts": verdicts}


def table_a(summary: dict) -> str:
    rows = ["| family / solver / k | instances | converged | iterations (median [q25, q75]) | error after budget "
            "(median) | suboptimality after budget (median) | nonzeros per column | TV to quadratic plan | "
            "TV to permutation |", "|---|---|---|---|---|---|---|---|---|"]

    def med(c, m, fmt="{:.3g}"):
        return "—" if m not in c else fmt.format(c[m]["median"])
    for key, c in summary["cells"].items():
        it = c["iterations"]
        rows.append(f"| {key} | {c['instances']} | {c['converged_share']:.0%} | {it['median']:.0f} "
                    f"[{it['q25']:.0f}, {it['q75']:.0f}] | {med(c, 'error_at_budget')} | "
                    f"{med(c, 'suboptimality_at_budget')} | {med(c, 'nnz_per_column', '{:.2f}')} | "
                    f"{med(c, 'tv_to_quadratic')} | {med(c, 'tv_to_assignment')} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- part B


def routing_stats(model, variables, batches, seed: int) -> dict[str, float]:
    """Training-mode routing of the final model on ``batches``: dropped fraction and max/mean expert load of the MoE
    layers (the capacity of training applies), averaged over batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def stats_of(tokens, key):
        _, stats = model.apply(variables, tokens[:, :-1], deterministic=False,
                               rngs={"jitter": key, "dropout": key})
        moe = [s for s in stats if s.expert_load.shape[0] > 1]
        return (jnp.mean(jnp.stack([s.dropped_fraction for s in moe])),
                jnp.mean(jnp.stack([s.expert_load.max() / s.expert_load.mean() for s in moe])))

    dropped, imbalance = [], []
    for i, batch in enumerate(batches):
        d, m = stats_of(jnp.asarray(batch["tokens"]), jax.random.key(seed * 1000 + i))
        dropped.append(float(d))
        imbalance.append(float(m))
    return {"train_mode_dropped_fraction": float(np.mean(dropped)), "train_mode_load_max_over_mean":
            float(np.mean(imbalance))}


def run_part_b(args, config_lib, variants, seeds, results, command) -> list[dict]:
    from moejax import data as data_lib
    from moejax.models import build_model
    from moejax.training.metrics import to_python

    def measure(config, state, final, variant, seed) -> dict:
        pipeline = data_lib.from_config(config.data)
        model = build_model(config.model, vocab_size=pipeline.meta.vocab_size)
        variables = {"params": state["params"], **state["moe_state"]}
        batches = [b for _, b in zip(range(int(config.train.eval_steps)), pipeline.eval)]
        loss = sweep.lm_loss_fn(model)(variables, batches)
        return {"final_eval": {k: to_python(v) for k, v in final.items()}, "eval_loss": loss,
                **routing_stats(model, variables, batches, seed)}

    def after(record: dict, workdir) -> None:
        print(f"B {record['variant']} seed {record['seed']}: eval loss {record['eval_loss']:.4f}, train-mode dropped "
              f"{record['train_mode_dropped_fraction']:.3f} ({record['wall_clock_s']:.0f} s)", flush=True)

    return sweep.run_all(args, "sparse_ot", config_lib, variants, seeds, results, command, measure, after)


def paired(runs: list[dict], a: str, b: str, field: str = "eval_loss") -> dict[str, Any] | None:
    """``field(a) - field(b)`` per common seed: per-seed values, mean ± std, 95% t-interval, seeds where a < b."""
    ra = {r["seed"]: r for r in runs if r["variant"] == a}
    rb = {r["seed"]: r for r in runs if r["variant"] == b}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = [ra[s][field] - rb[s][field] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, "negative": sum(d < 0 for d in diffs), **sweep.mean_std(diffs),
            "ci95": sweep.ci95(diffs)}


def router_verdict(runs: list[dict], other: str) -> dict[str, Any]:
    """Part B (exploratory: the abstract states no MoE number): ``ksparse_ot`` against ``other`` on the evaluation
    loss, paired by seed. Controls: ``ksparse_ot`` drops no token in training mode (its cardinality bound equals the
    capacity: the mechanism is active and exact) and ``topk`` drops some (the capacity binds, so the bound matters).
    better: the 95% interval of the paired difference is below 0; no worse: below ``MARGIN``; worse: above 0;
    inconclusive otherwise."""
    pair = paired(runs, "ksparse_ot", other)
    if pair is None:
        return {"verdict": "not run"}

    def mean_of(variant, field):
        v = [r[field] for r in runs if r["variant"] == variant]
        return sum(v) / len(v) if v else math.nan
    controls = {"ksparse_ot_dropped": mean_of("ksparse_ot", "train_mode_dropped_fraction"),
                "topk_dropped": mean_of("topk", "train_mode_dropped_fraction")}
    if not controls["ksparse_ot_dropped"] == 0.0 or not controls["topk_dropped"] > 0.0:
        return {"verdict": "not testable here", "controls": controls, "pair": pair}
    ci = pair["ci95"]
    if ci is None:
        verdict = "inconclusive (one seed)"
    elif ci[1] < 0:
        verdict = "better"
    elif ci[1] < MARGIN:
        verdict = "no worse"
    elif ci[0] > 0:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "controls": controls, "pair": pair,
            "why": f"eval loss ksparse_ot - {other}: {pair['mean']:+.4f} ± {pair['std']:.4f}, "
                   f"lower in {pair['negative']}/{len(pair['seeds'])} seeds"}


def summarize_b(runs: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"variants": {}}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        out["variants"][variant] = {
            "seeds": [r["seed"] for r in rs], "eval_loss": sweep.mean_std([r["eval_loss"] for r in rs]),
            "train_mode_dropped_fraction": sweep.mean_std([r["train_mode_dropped_fraction"] for r in rs]),
            "train_mode_load_max_over_mean": sweep.mean_std([r["train_mode_load_max_over_mean"] for r in rs]),
            "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs])}
    out["verdicts"] = {"B_vs_topk": router_verdict(runs, "topk"), "B_vs_sinkhorn": router_verdict(runs, "sinkhorn")}
    return out


def table_b(summary: dict) -> str:
    rows = ["| variant | seeds | eval loss (nats/byte) | train-mode dropped fraction | load max/mean | wall-clock s | "
            "paper |", "|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        rows.append(f"| {name} | {','.join(map(str, v['seeds']))} | {sweep.pm(v['eval_loss'], 4)} | "
                    f"{sweep.pm(v['train_mode_dropped_fraction'], 3)} | "
                    f"{sweep.pm(v['train_mode_load_max_over_mean'], 2)} | {v['wall_clock_s']['mean']:.0f} | "
                    "not read (image MoE; see README) |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ main


def report(summary: dict) -> str:
    lines = []
    if summary.get("A"):
        lines += ["Part A", "", table_a(summary["A"]), ""]
        lines += [f"- {k}: **{v['verdict']}** ({v.get('why', v.get('controls', ''))})"
                  for k, v in summary["A"]["verdicts"].items()]
        lines.append("")
    if summary.get("B"):
        lines += ["Part B", "", table_b(summary["B"]), ""]
        lines += [f"- {k}: **{v['verdict']}** ({v.get('why', v.get('controls', ''))})"
                  for k, v in summary["B"]["verdicts"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)
    config_lib = load_sibling("config")
    if args.preset == "pilot":
        args.results = args.results or str(REPO / "experiments" / "sparse_ot" / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    parts = set(args.parts.split(","))
    if not args.table:
        command = sweep.command_line(__file__, argv)
        if "A" in parts:
            run_part_a(args, config_lib, results, command)
        if "B" in parts:
            run_part_b(args, config_lib, variants, seeds, results, command)
    a_records = load_part_a(results)
    b_runs = sweep.load_runs(results, config_lib.VARIANTS)
    summary = {"A": summarize_a(a_records) if a_records else None, "B": summarize_b(b_runs) if b_runs else None}
    if not args.table:
        (results / "summary.json").write_text(json.dumps(summary, indent=2))
        (results / "table.md").write_text(report(summary) + "\n")
    print(report(summary))
    return summary


if __name__ == "__main__":
    main()
