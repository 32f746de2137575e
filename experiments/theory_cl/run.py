"""The theory_cl sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md and curves.png.

nice -n 10 python experiments/theory_cl/run.py --preset=full --threads=1 [--variants=...] [--seeds=0,1]
python experiments/theory_cl/run.py --preset=full --table       # the tables from the JSONs on disk

Each run is :func:`cl_moe.simulate` (numpy, a fraction of a second) followed by :func:`cl_moe.derived_metrics`.
A record holds the config, the seed, the curves (every ``log_every`` rounds), the derived metrics, the
wall-clock, the machine and the code's provenance: ``git_commit`` (``git rev-parse HEAD``) and ``dirty``
(``git status --porcelain``, ignoring this experiment's own ``results/`` and ``pilot/`` outputs). The ``full``
preset refuses to start from a dirty tree (the protocol's "every result from a recorded commit"; override with
``--allow_dirty`` for a trial, never for the README's numbers). ``--preset=pilot`` writes to ``pilot/``. A run
whose JSON exists is skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

# This checkout's moejax, not whichever one an editable install points to (on this machine another checkout in
# /tmp): the code that runs must be the code whose commit the record names.
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
OWN_OUTPUTS = ("experiments/theory_cl/results/", "experiments/theory_cl/pilot/")
# Paired comparisons (a - b, same seed): (label, a, b). The variant names are those of config.VARIANTS; a
# regime suffix is added for the pilot's other regimes.
GATE_PAIRS = [(f"never - frozen, M={k}", f"M{k}-never", f"M{k}-frozen") for k in ("N", "2N", "4N")]
EXPERT_PAIRS = [("4N - 2N experts, frozen", "M4N-frozen", "M2N-frozen"),
                ("2N - N experts, frozen", "M2N-frozen", "MN-frozen")]
SINGLE_PAIRS = [(f"M=1 - M={k}, frozen", "M1", f"M{k}-frozen") for k in ("N", "2N", "4N")]
METRICS = ("gen_error", "forgetting", "system_error_late_mean", "system_error_late_std")
# What the paper says about each comparison (direction only: we could not read its figures' values).
PAPER = {
    "never - frozen": "> 0: errors do not converge without termination (abstract; Fig. 2, values not read)",
    "4N - 2N experts": "conv. later, errors not lower (abstract; values not read)",
    "2N - N experts": "(M > N is the paper's regime; M = N not discussed in what we read)",
    "M=1 - M=": "> 0: MoE lower forgetting and generalisation error (abstract; values not read)",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("theory_cl", __doc__.splitlines()[0])
    p.add_argument("--no_plot", action="store_true", help="skip curves.png")
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "theory_cl", name)


def git(*argv: str) -> str | None:
    """stdout of ``git -C <this repository> argv`` (None when git fails or is absent)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=20)
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """The commit of the repository this file is in, and ``dirty``: uncommitted changes (tracked or not) outside
    this experiment's own outputs; plus where ``moejax`` was imported from (it must be this repository)."""
    import moejax
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all")
    paths = None if status is None else [l[3:] for l in status.splitlines()
                                         if l.strip() and not any(l[3:].startswith(o) for o in OWN_OUTPUTS)]
    return {"repository": str(REPO), "git_commit": head.strip() if head else None,
            "dirty": None if paths is None else bool(paths), "dirty_paths": None if paths is None else paths[:50],
            "moejax_path": str(pathlib.Path(moejax.__file__).resolve().parents[1])}


def host() -> dict[str, Any]:
    """Machine facts without importing jax (this experiment is numpy only)."""
    import numpy as np
    return {"uname": " ".join(os.uname()), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "threads_env": {k: os.environ.get(k) for k in
                                                     ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads == 1:  # before numpy loads its BLAS (a no-op if it already has: these matrices are tiny)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
    config_lib = load_sibling("config")
    cl_moe = load_sibling("cl_moe")
    if args.preset == "pilot":
        args.variants = args.variants or ",".join(config_lib.PILOT_VARIANTS)
        args.results = args.results or str(HERE / "pilot")
    code = provenance()
    if not args.table and args.preset == "full" and code["dirty"] is not False and not args.allow_dirty:
        raise SystemExit(f"refusing --preset=full from a tree with uncommitted changes {code['dirty_paths']} "
                         f"(commit first; --allow_dirty for a trial)")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    order = list(dict.fromkeys(config_lib.VARIANTS + config_lib.PILOT_VARIANTS))
    if args.table:
        summary = summarize(sweep.load_runs(results, order))
        print(table(summary))
        return summary
    machine, command = host(), sweep.command_line(__file__, argv)
    for variant in variants:
        for seed in seeds:
            out = results / f"{variant}_seed{seed}.json"
            if out.exists():
                continue
            config = config_lib.get_config(f"{args.preset},{variant}")
            config.seed = seed
            start = time.perf_counter()
            run = cl_moe.simulate(config_lib.sim_config(config), seed)
            metrics = cl_moe.derived_metrics(run, config.rounds, config.t1, config.late_fraction,
                                             config.conv_threshold, config.conv_window)
            record = {"experiment": "theory_cl", "preset": args.preset, "variant": variant, "seed": seed,
                      "metrics": metrics, **run, "wall_clock_s": time.perf_counter() - start,
                      "machine": machine, "code": code, "command": command, "config": config.to_dict()}
            out.write_text(json.dumps(rounded(record), separators=(",", ":")) + "\n")
            print(f"{variant} seed {seed}: G {metrics['gen_error']:.3f} F {metrics['forgetting']:.3f} "
                  f"sys(late) {metrics['system_error_late_mean']:.3f} conv {metrics['converged_round']} "
                  f"({record['wall_clock_s']:.2f} s)", flush=True)
    summary = summarize(sweep.load_runs(results, order))
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "table.md").write_text(table(summary) + "\n")
    if not args.no_plot:
        plot_curves(sweep.load_runs(results, order), str(results / "curves.png"))
    print(table(summary))
    return summary


def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits, recursively (keeps the 400-odd run files small; the analysis
    needs nowhere near float64 precision)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- aggregation
def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """a - b over seeds: mean, sample std, 95% t-interval of the mean (NaNs for one seed), how many seeds are > 0,
    < 0."""
    diffs = [x - y for x, y in zip(a, b)]
    ci = sweep.ci95(diffs) or [float("nan"), float("nan")]
    return {**sweep.mean_std(diffs), "ci95": ci, "n": len(diffs),
            "positive": sum(d > 0 for d in diffs), "negative": sum(d < 0 for d in diffs)}


def later(a: int | None, b: int | None) -> int:
    """+1 if convergence round a is later than b (None = never converged = later than any), -1 if earlier,
    0 if equal or both never."""
    if a == b:
        return 0
    if a is None or (b is not None and a > b):
        return 1
    return -1


def sign_test(k: int, n: int) -> float:
    """One-sided P(Binomial(n, 1/2) >= k)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n if n else float("nan")


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per variant: mean ± std over seeds of every derived metric; per comparison: paired differences."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    variants = {}
    for v, seeds in by_variant.items():
        ms = [seeds[s]["metrics"] for s in sorted(seeds)]
        row = {"seeds": sorted(seeds), "wall_clock_s": sweep.mean_std([seeds[s]["wall_clock_s"] for s in seeds])}
        for key in ms[0]:
            vals = [m[key] for m in ms if m[key] is not None]
            if key == "converged_round":
                row[key] = {"median": float(sorted_median(vals)) if vals else None, "converged": len(vals),
                            "of": len(ms)}
            elif vals:
                row[key] = sweep.mean_std(vals) | {"count": len(vals)}
        commits = {seeds[s]["code"].get("git_commit") for s in seeds}
        dirty = {seeds[s]["code"].get("dirty") for s in seeds}
        row["git_commits"], row["dirty"] = sorted(c or "none" for c in commits), sorted(str(d) for d in dirty)
        variants[v] = row
    regimes = sorted({v.partition("@")[2] for v in by_variant})
    comparisons = {}
    for regime in regimes:
        suffix = f"@{regime}" if regime else ""
        for label, a, b in GATE_PAIRS + EXPERT_PAIRS + SINGLE_PAIRS:
            a_, b_ = a + suffix, b + suffix
            if a_ not in by_variant or b_ not in by_variant:
                continue
            common = sorted(set(by_variant[a_]) & set(by_variant[b_]))
            ma = [by_variant[a_][s]["metrics"] for s in common]
            mb = [by_variant[b_][s]["metrics"] for s in common]
            entry = {"a": a_, "b": b_, "seeds": common}
            for key in METRICS:
                entry[key] = paired([m[key] for m in ma], [m[key] for m in mb])
            signs = [later(x["converged_round"], y["converged_round"]) for x, y in zip(ma, mb)]
            k, n = sum(s > 0 for s in signs), sum(s != 0 for s in signs)
            entry["converged_later"] = {"later": k, "earlier": n - k, "ties": len(signs) - n,
                                        "p_one_sided": sign_test(k, n)}
            entry["controls"] = controls(ma, mb, label)
            comparisons[label + (f" [{regime}]" if regime else "")] = entry
    return {"variants": variants, "comparisons": comparisons}


def controls(ma: list[dict], mb: list[dict], label: str) -> dict[str, Any]:
    """The README's positive controls and mechanism checks, counted over seeds (a, b as in the comparison).

    never - frozen: the frozen arm (b) is specialised at T1 (consistency of the first window after T1 >= 0.9)
    and the never-frozen gate (a) still moves after T1 (drift after T1 >= 1% of its drift up to T1).
    M=1 - M=k: the MoE arm (b) routes consistently late (consistency >= 0.9), covers every cluster, and uses
    every expert (active experts = M)."""
    n = len(mb)
    if label.startswith("never - frozen"):
        return {"of": n,
                "specialised_at_t1": sum((m["consistent_first_after_t1"] or 0) >= 0.9 for m in mb),
                "gate_moves_after_t1": sum(m["gate_drift_after_t1"] >= 0.01 * m["gate_drift_to_t1"] for m in ma)}
    if label.startswith("M=1"):
        return {"of": n, "consistent_late": sum((m["consistent_late"] or 0) >= 0.9 for m in mb),
                "all_clusters_covered": sum(m["clusters_covered"] == m["clusters"] for m in mb),
                "all_experts_active": sum(m["active_experts"] == m["experts"] for m in mb)}
    return {"of": n}


def sorted_median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def fmt(s: dict | None, digits: int = 3) -> str:
    return "–" if not s else sweep.pm(s, digits)


def table(summary: dict) -> str:
    """Markdown: one row per variant, then one row per paired comparison (with the paper's direction)."""
    lines = ["| variant | seeds | gen. error G_T | forgetting F_T | system error, last 20% (mean) | "
             "system error, last 20% (std over logs) | consistent routing, first window after T1 | "
             "consistent routing, last 20% | converged round (median; converged/seeds) | active experts | "
             "gate drift after T1 | wall-clock per run (s) |",
             "|---" * 12 + "|"]
    for v, r in summary["variants"].items():
        conv = r.get("converged_round", {})
        conv_s = f"{conv.get('median'):.0f} ({conv['converged']}/{conv['of']})" if conv.get("median") is not None \
            else f"– (0/{conv.get('of', 0)})"
        lines.append(f"| {v} | {len(r['seeds'])} | {fmt(r.get('gen_error'))} | {fmt(r.get('forgetting'))} | "
                     f"{fmt(r.get('system_error_late_mean'))} | {fmt(r.get('system_error_late_std'))} | "
                     f"{fmt(r.get('consistent_first_after_t1'), 2)} | {fmt(r.get('consistent_late'), 2)} | {conv_s} | "
                     f"{fmt(r.get('active_experts'), 1)} | {fmt(r.get('gate_drift_after_t1'), 1)} | "
                     f"{fmt(r.get('wall_clock_s'), 2)} |")
    lines += ["", "| paired by seed (a - b) | paper says | G_T: mean ± std [95% CI] (+/-) | "
              "F_T: mean ± std [95% CI] (+/-) | system error late mean | system error late std | "
              "a converges later / earlier / ties (sign test p) |", "|---" * 7 + "|"]
    for label, c in summary["comparisons"].items():
        paper = next((t for key, t in PAPER.items() if label.startswith(key)), "")
        cells = []
        for key in METRICS:
            p = c[key]
            cells.append(f"{p['mean']:+.3f} ± {p['std']:.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] "
                         f"({p['positive']}/{p['negative']})")
        cl = c["converged_later"]
        lines.append(f"| {label} | {paper} | {' | '.join(cells)} | {cl['later']} / {cl['earlier']} / {cl['ties']} "
                     f"(p = {cl['p_one_sided']:.3g}) |")
    lines += ["", "| controls and mechanism checks (seeds meeting each, of n) | counts |", "|---|---|"]
    for label, c in summary["comparisons"].items():
        ctl = {k: v for k, v in c.get("controls", {}).items() if k != "of"}
        if ctl:
            lines.append(f"| {label} | " + ", ".join(f"{k.replace('_', ' ')} {v}/{c['controls']['of']}"
                                                   for k, v in ctl.items()) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: str) -> None:
    """Generalisation error and system error against the round, mean over seeds, primary-regime variants."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "@" not in r["variant"]:
            groups.setdefault(r["variant"], []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for v, rs in groups.items():
        style = "--" if v.endswith("never") else "-"
        for ax, key in zip(axes, ("gen_error", "forgetting", "system_error")):
            rounds = rs[0]["curve"]["round"]
            ax.plot(rounds, np.mean([r["curve"][key] for r in rs], 0), style, label=v, lw=1.2)
    for ax, key in zip(axes, ("generalisation error G_t", "forgetting F_t", "system error (noise-free routing)")):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("round")
        ax.set_yscale("symlog", linthresh=1e-2)
        t1 = runs[0]["config"]["t1"] if runs else None
        if t1:
            ax.axvline(t1, color="grey", lw=0.6)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
