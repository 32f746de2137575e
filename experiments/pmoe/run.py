"""The pMoE sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md; decision rules applied.

nice -n 10 python experiments/pmoe/run.py --preset=full --threads=1 [--variants=cnn_n16,pmoe_n16_l4] [--seeds=0,1]
python experiments/pmoe/run.py --preset=full --table          # tables and verdicts of the results on disk

Each run is :func:`patch_moe.run`: one variant, one seed, trained from the same initialisation at every
training-set size of the grid (nested prefixes of one pool of samples; the data depend only on the seed and n, so
every variant of a seed with the same n sees the same samples), then measured on the seed's test set. A record holds
the config, the seed, per size the test and training accuracy (and for pMoE the routing statistics, trained and at
initialisation), the sample complexity, the wall-clock, the machine and the code's provenance (``git_commit``,
``dirty``; :func:`moejax.sweep.code_version`). ``--preset=full`` refuses a tree with uncommitted changes (outside
the experiments' ``results/`` and ``pilot/``); ``--preset=pilot`` writes to ``pilot/``. A run whose JSON exists is
skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

# This checkout's moejax, not whichever one an editable install points to (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
# Every threshold of the decision rules (README.md, "Decision rules"), named once.
MIN_DEFINED = 0.8          # a sample complexity is usable when at least this share of seeds is not censored
ROUTE_CAPTURE = 0.95       # claim 3: the best expert of each class routes its discriminative patch this often
CENSOR_RIGHT = 2.0         # a sample complexity not reached on the grid counts as CENSOR_RIGHT * max(sizes)
CLAIMS = ("claim1_sample_complexity_factor", "claim2_beats_single_expert", "claim3_discriminative_routing")
PAPER = {
    "claim1_sample_complexity_factor": "reduction by a factor polynomial in n/l (abstract; the theorem's exponent "
                                       "and the figures' values not read)",
    "claim2_beats_single_expert": "pMoE better than the CNN of the same or larger capacity (abstract; MNIST/CIFAR "
                                  "figures not read)",
    "claim3_discriminative_routing": "routers filter label-irrelevant patches and route class-discriminative "
                                     "patches to the same expert (abstract; values not read)",
}


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "pmoe", name)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("pmoe", __doc__.splitlines()[0])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)               # one XLA thread with --threads=1; refuses --preset=full from a dirty tree
    import jax

    config_lib = load_sibling("config")
    pm = load_sibling("patch_moe")
    if args.preset == "pilot":
        args.variants = args.variants or ",".join(config_lib.PILOT_VARIANTS)
        args.results = args.results or str(HERE / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        summary = summarize(sweep.load_runs(results, config_lib.VARIANTS), config_lib)
        print(report(summary))
        return summary
    host, code, command = sweep.machine(), sweep.code_version(), sweep.command_line(__file__, argv)
    for variant in variants:
        for seed in seeds:
            out = results / f"{variant}_seed{seed}.json"
            if out.exists():
                continue
            config = config_lib.get_config(f"{args.preset},{variant}")
            config.seed = seed
            setup = config_lib.setup(config)
            start = time.perf_counter()
            measured = pm.run(setup, seed)
            sc, status = pm.sample_complexity(setup.sizes, measured["test_acc"], config.threshold)
            record = {"experiment": "pmoe", "preset": args.preset, "variant": variant, "seed": seed,
                      "sizes": list(setup.sizes), **measured,
                      "sample_complexity": {"value": sc, "status": status, "threshold": config.threshold},
                      "wall_clock_s": time.perf_counter() - start, "jax_version": jax.__version__,
                      "machine": host, "code": code, "command": command, "config": config.to_dict()}
            out.write_text(json.dumps(rounded(record), separators=(",", ":")) + "\n")
            acc = measured["test_acc"]
            print(f"{variant} seed {seed}: test acc {acc[0]:.3f} (N={setup.sizes[0]}) .. {acc[-1]:.3f} "
                  f"(N={setup.sizes[-1]}); N* = {sc if sc is None else round(sc, 1)} ({status}) "
                  f"({record['wall_clock_s']:.1f} s)", flush=True)
    summary = summarize(sweep.load_runs(results, config_lib.VARIANTS), config_lib)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "table.md").write_text(report(summary) + "\n")
    print(report(summary))
    return summary


def rounded(obj: Any, digits: int = 5) -> Any:
    """Floats to ``digits`` significant digits, recursively (keeps the run files small)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------- per-run quantities
def log2_sc(run: dict) -> float:
    """log2 of the run's sample complexity, a right-censored one (not reached on the grid) counted as
    ``CENSOR_RIGHT * max(sizes)``, a left-censored one as the smallest size (README.md, "Definitions")."""
    sc = run["sample_complexity"]
    value = sc["value"] if sc["status"] != "right" else CENSOR_RIGHT * max(run["sizes"])
    return math.log2(value)


def acc_area(run: dict) -> float:
    """Mean test accuracy over the grid of training-set sizes (each size weighted equally)."""
    return sum(run["test_acc"]) / len(run["test_acc"])


def routing_at(run: dict, which: str = "routing", size_index: int = -1) -> dict[str, float]:
    """Claim 3's quantities of a pMoE run at one training-set size (``which="routing_init"``: the routers at
    initialisation). ``capture``: the smaller over the two classes of the best expert's capture rate (the share
    of the class's test samples whose discriminative patch is among that expert's l patches); ``gate``: the
    smaller over the two classes of the gate weight that best expert gives the discriminative patch (among
    experts with the same capture rate, the best is the one giving the patch the larger gate weight)."""
    r = run[which]
    cap, gate = r["capture"], r["gate"]
    if which == "routing":
        cap, gate = cap[size_index], gate[size_index]
    best = [max(range(len(cap)), key=lambda s: (cap[s][c], gate[s][c])) for c in (0, 1)]   # ties: larger gate
    return {"capture": min(cap[best[c]][c] for c in (0, 1)), "gate": min(gate[best[c]][c] for c in (0, 1)),
            "best_experts": best}


# ------------------------------------------------------------------------------------------------ statistics
def by_seed(runs: list[dict], variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["variant"] == variant}


def paired_values(diffs: list[float], seeds: list[int]) -> dict[str, Any]:
    return {"seeds": seeds, "per_seed": diffs, "positive": sum(d > 0 for d in diffs),
            "negative": sum(d < 0 for d in diffs), **sweep.mean_std(diffs), "ci95": sweep.ci95(diffs)}


def paired(runs: list[dict], a: str, b: str, fa, fb=None) -> dict[str, Any] | None:
    """``fa(run of a) - fb(run of b)`` over the seeds both have (``fb = fa`` by default; ``a == b`` compares two
    quantities of one run): per-seed values, mean ± std, 95% t-interval, seeds above / below 0."""
    fb = fa if fb is None else fb
    ra, rb = by_seed(runs, a), by_seed(runs, b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    return paired_values([fa(ra[s]) - fb(rb[s]) for s in seeds], seeds)


def holds(pair: dict | None) -> bool:
    """The 95% t-interval of the mean lies entirely above 0."""
    return pair is not None and pair["ci95"] is not None and pair["ci95"][0] > 0


def reversed_(pair: dict | None) -> bool:
    return pair is not None and pair["ci95"] is not None and pair["ci95"][1] < 0


def direction(pair: dict | None) -> str:
    return "holds" if holds(pair) else "reversed" if reversed_(pair) else "inconclusive"


def defined(runs: list[dict], variant: str) -> dict[str, Any]:
    """Control: the variant's sample complexity is neither left- nor right-censored in at least MIN_DEFINED of
    its seeds (the task is neither at ceiling at the smallest size nor out of reach at the largest)."""
    rs = list(by_seed(runs, variant).values())
    status = [r["sample_complexity"]["status"] for r in rs]
    ok = status.count("ok")
    return {"passes": bool(rs) and ok >= MIN_DEFINED * len(rs), "ok": ok, "left": status.count("left"),
            "right": status.count("right"), "of": len(rs)}


def learned(runs: list[dict], variant: str, threshold: float) -> dict[str, Any]:
    """Control: test accuracy at the largest size reaches the threshold in at least MIN_DEFINED of the seeds."""
    rs = list(by_seed(runs, variant).values())
    ok = sum(r["test_acc"][-1] >= threshold for r in rs)
    return {"passes": bool(rs) and ok >= MIN_DEFINED * len(rs), "seeds": ok, "of": len(rs)}


def not_at_ceiling(runs: list[dict], variants, threshold: float) -> dict[str, Any]:
    """Control: at the smallest size, every variant's mean test accuracy over seeds is below the threshold."""
    means = {}
    for v in variants:
        rs = list(by_seed(runs, v).values())
        means[v] = sum(r["test_acc"][0] for r in rs) / len(rs) if rs else None
    return {"passes": all(m is not None and m < threshold for m in means.values()), "mean_acc_smallest": means}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def axis_slope(runs: list[dict], axis, config_lib) -> dict[str, Any]:
    """Per seed, the slope of ``D = log2 N*_cnn - log2 N*_pmoe`` on ``log2(n / l)`` over an axis's
    configurations (seeds that have all of them), then its mean, std and 95% interval over seeds."""
    xs, per_config = [], []
    for pmoe, cnn in axis:
        p = config_lib.parse_variant(pmoe)
        xs.append(math.log2(p["n"] / p["l"]))
        per_config.append((by_seed(runs, pmoe), by_seed(runs, cnn)))
    seeds = sorted(set.intersection(*[set(a) & set(b) for a, b in per_config])) if per_config else []
    if not seeds:
        return {"pair": None, "testable": False, "controls": {}}
    values = [slope(xs, [log2_sc(b[s]) - log2_sc(a[s]) for a, b in per_config]) for s in seeds]
    controls = {v: defined(runs, v) for pair in axis for v in pair}
    return {"pair": paired_values(values, seeds), "log2_n_over_l": xs,
            "testable": all(c["passes"] for c in controls.values()), "controls": controls}


# --------------------------------------------------------------------------------------------- decision rules
def claim1(runs: list[dict], config_lib) -> dict[str, Any]:
    """Claim 1: pMoE needs fewer samples than the CNN of the same filters at the primary configuration (1a), and
    the reduction grows with n/l along both axes (1b-n: n at l = 4; 1b-l: l at n = 16)."""
    cnn, pmoe = config_lib.PRIMARY
    pair = paired(runs, cnn, pmoe, log2_sc)
    if pair is None:
        return {"verdict": "not run", "why": f"missing {cnn} or {pmoe}"}
    controls = {v: defined(runs, v) for v in (cnn, pmoe)}
    per_config = {f"{c} - {p}": paired(runs, c, p, log2_sc) for p, c in config_lib.N_AXIS + config_lib.L_AXIS}
    axes = {"n": axis_slope(runs, config_lib.N_AXIS, config_lib), "l": axis_slope(runs, config_lib.L_AXIS, config_lib)}
    a = holds(pair)
    slopes = {k: v["testable"] and holds(v["pair"]) for k, v in axes.items()}
    if not all(c["passes"] for c in controls.values()):
        verdict, why = "not testable here", "the primary configuration's sample complexity is censored in too many seeds"
    elif a and all(slopes.values()):
        verdict, why = "reproduced", "fewer samples at the primary configuration, reduction growing with n/l on both axes"
    elif a:
        verdict = "partly"
        grow = [k for k, v in slopes.items() if v]
        why = "fewer samples at the primary configuration; reduction growing with n/l " + (
            f"on the {grow[0]} axis only" if grow else "on neither axis")
    else:
        verdict = "not reproduced"
        why = "pMoE does not need clearly fewer samples at the primary configuration" + (
            " (reversed: it needs more)" if reversed_(pair) else "")
    return {"verdict": verdict, "why": why, "log2_ratio_primary": pair, "direction_primary": direction(pair),
            "per_config": per_config, "axes": {k: {**v, "direction": direction(v["pair"])} for k, v in axes.items()},
            "controls": controls}


def claim2(runs: list[dict], config_lib) -> dict[str, Any]:
    """Claim 2: at the primary configuration, pMoE's test accuracy averaged over the grid exceeds that of the CNN
    with the same number of filters and that of the CNN with 4x the filters (paired by seed)."""
    cnn, pmoe = config_lib.PRIMARY
    large = cnn.replace("cnn_", "cnn4x_")
    pairs = {"same": paired(runs, pmoe, cnn, acc_area), "larger": paired(runs, pmoe, large, acc_area)}
    if pairs["same"] is None and pairs["larger"] is None:
        return {"verdict": "not run", "why": f"missing {pmoe}, {cnn} or {large}"}
    controls = {"not_at_ceiling": not_at_ceiling(runs, (pmoe, cnn, large), config_lib.THRESHOLD),
                "pmoe_learns": learned(runs, pmoe, config_lib.THRESHOLD)}
    better = [k for k, p in pairs.items() if holds(p)]
    if not all(c["passes"] for c in controls.values()):
        verdict, why = "not testable here", "a control failed: " + ", ".join(k for k, c in controls.items()
                                                                             if not c["passes"])
    elif len(better) == 2:
        verdict, why = "reproduced", "better than the CNN of the same and of 4x the filters"
    elif better:
        verdict, why = "partly", f"better than the CNN of the {better[0]} capacity only"
    else:
        verdict, why = "not reproduced", "better than neither CNN" + (
            " (reversed against " + ", ".join(k for k, p in pairs.items() if reversed_(p)) + ")"
            if any(reversed_(p) for p in pairs.values()) else "")
    sc = {k: paired(runs, c, pmoe, log2_sc) for k, c in (("same", cnn), ("larger", large))}
    return {"verdict": verdict, "why": why, "acc_area_minus_cnn": pairs,
            "directions": {k: direction(p) for k, p in pairs.items()}, "log2_sc_ratio": sc, "controls": controls}


def claim3(runs: list[dict], config_lib) -> dict[str, Any]:
    """Claim 3, at the primary configuration and the largest training-set size: (3a) the best expert of each
    class routes the class's discriminative patch in at least ROUTE_CAPTURE of the test samples in at least
    MIN_DEFINED of the seeds, and more often than the same routers at initialisation (paired); (3b) the gate
    weight that expert gives the patch exceeds the initial routers' (the routers filter the l - 1 label-irrelevant
    patches they also route) by a paired difference whose interval is above 0 and in mean at least 1/l."""
    pmoe = config_lib.PRIMARY[1]
    rs = by_seed(runs, pmoe)
    if not rs:
        return {"verdict": "not run", "why": f"missing {pmoe}"}
    l = config_lib.parse_variant(pmoe)["l"]
    seeds = sorted(rs)
    trained = [routing_at(rs[s]) for s in seeds]
    init = [routing_at(rs[s], "routing_init") for s in seeds]
    capture = paired_values([t["capture"] - i["capture"] for t, i in zip(trained, init)], seeds)
    gate = paired_values([t["gate"] - i["gate"] for t, i in zip(trained, init)], seeds)
    high = sum(t["capture"] >= ROUTE_CAPTURE for t in trained)
    a = high >= MIN_DEFINED * len(seeds) and holds(capture)
    b = holds(gate) and gate["mean"] >= 1.0 / l
    controls = {"pmoe_learns": learned(runs, pmoe, config_lib.THRESHOLD)}
    if not controls["pmoe_learns"]["passes"]:
        verdict, why = "not testable here", "pMoE did not learn the task at the largest size"
    elif a and b:
        verdict, why = "reproduced", "discriminative patches routed to one expert per class, with most of its gate weight"
    elif a or b:
        verdict, why = "partly", ("routed to one expert per class" if a else "gate weight concentrated") + " only"
    else:
        verdict, why = "not reproduced", "neither consistent routing nor gate concentration beyond initialisation"
    return {"verdict": verdict, "why": why, "seeds_capture_high": high, "of": len(seeds),
            "capture_trained": sweep.mean_std([t["capture"] for t in trained]),
            "capture_init": sweep.mean_std([i["capture"] for i in init]),
            "gate_trained": sweep.mean_std([t["gate"] for t in trained]),
            "gate_init": sweep.mean_std([i["gate"] for i in init]),
            "capture_minus_init": capture, "gate_minus_init": gate, "controls": controls}


def summarize(runs: list[dict], config_lib) -> dict[str, Any]:
    """Per variant: test accuracy per size and sample complexity over seeds; the three claims' verdicts."""
    variants = {}
    for v in config_lib.VARIANTS:
        rs = [by_seed(runs, v)[s] for s in sorted(by_seed(runs, v))]
        if not rs:
            continue
        sizes = rs[0]["sizes"]
        status = [r["sample_complexity"]["status"] for r in rs]
        row = {"seeds": [r["seed"] for r in rs], "sizes": sizes,
               "test_acc": [sweep.mean_std([r["test_acc"][i] for r in rs]) for i in range(len(sizes))],
               "log2_sc": sweep.mean_std([log2_sc(r) for r in rs]),
               "sc_status": {k: status.count(k) for k in ("ok", "left", "right")},
               "acc_area": sweep.mean_std([acc_area(r) for r in rs]),
               "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs]),
               "git_commits": sorted({str(r["code"].get("git_commit")) for r in rs}),
               "dirty": sorted({str(r["code"].get("dirty")) for r in rs})}
        if "routing" in rs[0]:
            row["routing_capture"] = sweep.mean_std([routing_at(r)["capture"] for r in rs])
            row["routing_gate"] = sweep.mean_std([routing_at(r)["gate"] for r in rs])
            row["routing_capture_init"] = sweep.mean_std([routing_at(r, "routing_init")["capture"] for r in rs])
        variants[v] = row
    verdicts = {"claim1_sample_complexity_factor": claim1(runs, config_lib),
                "claim2_beats_single_expert": claim2(runs, config_lib),
                "claim3_discriminative_routing": claim3(runs, config_lib)}
    return {"variants": variants, "verdicts": verdicts}


# --------------------------------------------------------------------------------------------------- tables
def _ci(p: dict | None, digits: int = 2) -> str:
    if p is None:
        return "–"
    ci = p["ci95"]
    ci_s = f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "[–]"
    return f"{p['mean']:+.{digits}f} ± {p['std']:.{digits}f} {ci_s} ({p['positive']}/{p['negative']})"


def report(summary: dict) -> str:
    """Markdown: per variant accuracy at some sizes and the sample complexity; the paired comparisons; verdicts."""
    show = (4, 16, 64, 256, 1024)
    lines = []
    variants = summary["variants"]
    if variants:
        sizes = next(iter(variants.values()))["sizes"]
        cols = [i for i, s in enumerate(sizes) if s in show] or list(range(len(sizes)))
        lines += ["| variant | seeds | " + " | ".join(f"test acc N={sizes[i]}" for i in cols)
                  + " | mean acc over grid | N* (2^mean log2) | N* ok/left/right | best-expert capture (init) "
                  "| gate on it | s per run |", "|---" * (len(cols) + 8) + "|"]
        for v, r in variants.items():
            cap = (f"{r['routing_capture']['mean']:.2f} ({r['routing_capture_init']['mean']:.2f})"
                   if "routing_capture" in r else "–")
            gate = f"{r['routing_gate']['mean']:.2f}" if "routing_gate" in r else "–"
            st = r["sc_status"]
            lines.append(f"| {v} | {len(r['seeds'])} | " + " | ".join(sweep.pm(r["test_acc"][i], 3) for i in cols)
                         + f" | {sweep.pm(r['acc_area'], 3)} | {2 ** r['log2_sc']['mean']:.1f} "
                         f"(log2 {sweep.pm(r['log2_sc'], 2)}) | {st['ok']}/{st['left']}/{st['right']} | {cap} | "
                         f"{gate} | {r['wall_clock_s']['mean']:.1f} |")
    v = summary["verdicts"]
    c1, c2, c3 = (v[c] for c in CLAIMS)
    lines += ["", "| paired by seed | statistic | mean ± std [95% CI] (seeds +/-) | paper |", "|---|---|---|---|"]
    for label, p in c1.get("per_config", {}).items():
        lines.append(f"| {label} | log2 N* ratio (> 0: pMoE needs fewer) | {_ci(p)} | {PAPER[CLAIMS[0]]} |")
    for k, ax in c1.get("axes", {}).items():
        lines.append(f"| slope along the {k} axis | d(log2 ratio)/d(log2 n/l) | {_ci(ax['pair'])} "
                     f"| > 0 (abstract) |")
    for k, p in c2.get("acc_area_minus_cnn", {}).items():
        lines.append(f"| pMoE - CNN ({k} capacity) | mean test acc over the grid | {_ci(p, 3)} | {PAPER[CLAIMS[1]]} |")
    for k, p in c2.get("log2_sc_ratio", {}).items():
        lines.append(f"| CNN ({k} capacity) - pMoE | log2 N* ratio (reported) | {_ci(p)} | {PAPER[CLAIMS[1]]} |")
    for k in ("capture_minus_init", "gate_minus_init"):
        if k in c3:
            lines.append(f"| trained - initial router | {k.replace('_minus_init', '')} at the largest N | "
                         f"{_ci(c3[k])} | {PAPER[CLAIMS[2]]} |")
    lines += ["", "| claim | verdict | why | controls |", "|---|---|---|---|"]
    for claim in CLAIMS:
        c = v[claim]
        ctl = c.get("controls", {})
        ctl_s = ", ".join(f"{k}: {'pass' if x.get('passes') else 'FAIL'}" for k, x in ctl.items())
        lines.append(f"| {claim} | **{c['verdict']}** | {c.get('why', '')} | {ctl_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
