"""Aggregation, decision rules, markdown tables and plots of the DynaMoE sweep (run.py writes the per-run JSONs).

Spread is the sample standard deviation (ddof=1) over seeds. Every comparison is paired by seed (same
``config.seed`` and data order): per-seed differences (or log ratios), their mean ± std, 95% t-interval and how
many seeds go each way. The three pre-registered claims (README "Decision rules") are decided per dataset by
:func:`claim_a`, :func:`claim_b`, :func:`claim_c` and combined over datasets by :func:`combine`, with the
thresholds named below; :func:`verdicts` applies them to a list of run records.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from moejax import sweep

GROUPS = ("all", "router", "experts")

# ----------------------------------------------------------------------------- the registered thresholds
# Every threshold of the decision rules (README "Decision rules (pre-registered)"), named once.
MIN_SEED_SHARE = 0.7     # a direction "holds" in a comparison when it holds in at least 70% of the seeds (7 of 10)
FLOOR, CEILING = 0.30, 0.95   # task control: the reference variant's mean test accuracy lies in [FLOOR, CEILING]
MAX_CI_HALF = 0.02       # resolution control: half-width of the 95% t-interval of a paired accuracy difference
MIN_DYNAMIC = 0.05       # dynamic control: mean off-mode fraction of test examples over the layers with k >= 2
MIN_SAVING = 0.10        # claim (c): dynamic uses at least 10% fewer expert parameters per token than fixed top-k
NI_MARGIN = 0.01         # claim (c): accuracy non-inferiority margin (absolute; 10 of 1000 mnist1d test examples)
OUTCOMES = sweep.OUTCOMES
# The primary configuration of each claim: (variant a, variant b) compared as a - b (or a / b), on every dataset
# of config.REGISTERED_DATASETS; the pairs in SECONDARY are reported beside them and do not decide.
PRIMARY = {"a": ("dyn-descending", "dyn-uniform"), "b": ("dyn-uniform", "top-uniform"),
           "c": ("dyn-uniform", "top-uniform")}
SECONDARY = {"a": (("top-descending", "top-uniform"), ("dyn-ascending", "dyn-uniform")),
             "b": (("dyn-descending", "top-descending"),),
             "c": (("dyn-descending", "top-descending"), ("dyn-descending", "top-uniform"))}
CLAIMS = {"a": "descending schedules outperform uniform baselines on image classification",
          "b": "dynamic routing reduces gradient variance during training",
          "c": "DynaMoE achieves superior parameter efficiency compared to static baselines"}
PAPER = {"a": "> 0 (abstract: descending 'outperform uniform baselines' on MNIST, Fashion-MNIST, CIFAR-10); "
              "values not read",
         "b": "< 1 (abstract: 'reduces gradient variance'); values not read",
         "c": "fewer parameters at equal or better quality (abstract: 'superior parameter efficiency'); "
              "values not read"}


def _dataset_routing(variant: str) -> tuple[str, str]:
    dataset, _, routing = variant.partition("-")
    return dataset, routing


def summarize(runs: Sequence[dict]) -> dict[str, Any]:
    """``{"variants": {variant: row}, "comparisons": {dataset: {...}}}``; see the module docstring."""
    variants: dict[str, Any] = {}
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, rs in by_variant.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "layers": rs[0]["layers"],
                               "params": rs[0]["params"],
                               "accuracy": sweep.mean_std([r["final_eval"]["accuracy"] for r in rs]),
                               "eval_loss": sweep.mean_std([r["final_eval"]["loss"] for r in rs]),
                               "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs])}
        layers = len(rs[0]["layers"])
        row["experts_per_token"] = [sweep.mean_std([r["experts_per_token_train"]["mean"][l] for r in rs])
                                    for l in range(layers)]
        row["experts_per_token_total"] = sweep.mean_std([sum(r["experts_per_token_train"]["mean"]) for r in rs])
        row["expert_flops_share"] = sweep.mean_std([_active_share(r) for r in rs])
        if all("test_routing" in r for r in rs):
            row["test_experts_per_token"] = [sweep.mean_std([r["test_routing"]["experts_per_token"][l] for r in rs])
                                             for l in range(layers)]
            row["test_expert_share"] = sweep.mean_std([expert_share(r) for r in rs])
            row["off_mode_fraction"] = sweep.mean_std([off_mode(r) for r in rs])
            row["loss_roughness"] = sweep.mean_std([loss_roughness(r) for r in rs])
        noise = []
        for i, point in enumerate(rs[0]["grad_noise"]):
            entry = {"step": point["step"]}
            for group in GROUPS:
                for stat in ("noise", "trace", "mean_sq_norm"):
                    entry[f"{group}_{stat}"] = sweep.mean_std([r["grad_noise"][i]["groups"][group][stat] for r in rs])
            noise.append(entry)
        row["grad_noise"] = noise
        variants[variant] = row
    comparisons: dict[str, Any] = {}
    for dataset in dict.fromkeys(_dataset_routing(v)[0] for v in by_variant):
        comparisons[dataset] = _compare(dataset, by_variant)
    return {"variants": variants, "comparisons": comparisons, "verdicts": verdicts(runs)}


def _active_share(run: dict) -> float:
    """Expert parameters used per token / expert parameters of the whole model (all experts are equal-sized)."""
    return sum(run["experts_per_token_train"]["mean"]) / sum(l["num_experts"] for l in run["layers"])


def _paired(a: Sequence[dict], b: Sequence[dict], value, op) -> dict[str, Any] | None:
    """``op(value(a_seed), value(b_seed))`` over the seeds both have: mean ± std, the values, and the seeds."""
    bs = {r["seed"]: r for r in b}
    vals = [op(value(r), value(bs[r["seed"]])) for r in a if r["seed"] in bs]
    if not vals:
        return None
    return {**sweep.mean_std(vals), "values": vals, "n": len(vals), "ci95": sweep.ci95(vals),
            "positive": sum(v > 0 for v in vals), "negative": sum(v < 0 for v in vals)}


def _compare(dataset: str, by_variant: dict[str, list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def runs(routing):
        return by_variant.get(f"{dataset}-{routing}", [])

    acc = lambda r: r["final_eval"]["accuracy"]  # noqa: E731
    diff = lambda x, y: x - y  # noqa: E731
    for kind in ("dyn", "top"):
        for schedule in ("descending", "ascending", "pyramid", "hourglass", "wave"):
            p = _paired(runs(f"{kind}-{schedule}"), runs(f"{kind}-uniform"), acc, diff)
            if p is not None:
                out[f"accuracy_{kind}-{schedule}_minus_{kind}-uniform"] = p
    for schedule in ("uniform", "descending"):
        p = _paired(runs(f"dyn-{schedule}"), runs(f"top-{schedule}"), acc, diff)
        if p is not None:
            out[f"accuracy_dyn-{schedule}_minus_top-{schedule}"] = p
        dyn, top = runs(f"dyn-{schedule}"), runs(f"top-{schedule}")
        if not dyn or not top:
            continue
        for stat in ("noise", "trace"):
            for i, point in enumerate(dyn[0]["grad_noise"]):
                for group in GROUPS:
                    p = _paired(dyn, top, lambda r: r["grad_noise"][i]["groups"][group][stat],
                                lambda x, y: math.log(x / y))
                    if p is not None:
                        p["ratio_geomean"] = math.exp(p["mean"])
                        p["dyn_lower_in"] = sum(v < 0 for v in p["values"])
                        out[f"log_{stat}_ratio_dyn_over_top-{schedule}_{group}_step{point['step']}"] = p
    return out


# ----------------------------------------------------------------------------- decision rules

def accuracy(run: dict) -> float:
    return run["final_eval"]["accuracy"]


def expert_share(run: dict) -> float:
    """Expert parameters used per test example / expert parameters of the model (all experts are equal-sized):
    the sum over MoE layers of the mean experts per test example, over the total number of experts."""
    return sum(run["test_routing"]["experts_per_token"]) / sum(l["num_experts"] for l in run["layers"])


def off_mode(run: dict) -> float:
    """Mean over the MoE layers with k >= 2 of the fraction of test examples whose number of experts differs from
    that layer's most common number (0 when no layer has k >= 2: nothing can vary)."""
    fr = [f for f, l in zip(run["test_routing"]["off_mode_fraction"], run["layers"]) if l["k"] >= 2]
    return sum(fr) / len(fr) if fr else 0.0


def mean_log_ratio(stat: str, group: str = "all") -> Callable[[dict, dict], float]:
    """``(run a, run b) -> mean over the measurement steps of log(stat_a / stat_b)`` of a gradient-noise group."""
    def f(a: dict, b: dict) -> float:
        vals = [math.log(pa["groups"][group][stat] / pb["groups"][group][stat])
                for pa, pb in zip(a["grad_noise"], b["grad_noise"])]
        return sum(vals) / len(vals)
    return f


def loss_roughness(run: dict) -> float:
    """Std (ddof=1) of the successive differences of the logged training loss over the second half of training:
    how jagged the loss curve is (reported beside claim (b)'s "improved convergence stability", not deciding)."""
    curve = [p["loss"] for p in run["train_curve"]]
    tail = curve[len(curve) // 2:]
    diffs = [y - x for x, y in zip(tail, tail[1:])]
    return sweep.mean_std(diffs)["std"] if len(diffs) > 1 else 0.0


def paired(a: Sequence[dict], b: Sequence[dict], f: Callable[[dict, dict], float]) -> dict[str, Any] | None:
    """``f(run of a, run of b)`` over the seeds both have (:func:`moejax.sweep.paired`)."""
    return sweep.paired([a, b], f)


def _need(p: Mapping[str, Any]) -> int:
    return math.ceil(MIN_SEED_SHARE * p["n"] - 1e-9)


def clearly_positive(p: Mapping[str, Any] | None) -> bool:
    """> 0 in at least MIN_SEED_SHARE of the seeds and the 95% interval of the mean above 0."""
    return sweep.clearly(p, +1, MIN_SEED_SHARE)


def clearly_negative(p: Mapping[str, Any] | None) -> bool:
    return sweep.clearly(p, -1, MIN_SEED_SHARE)


def task_control(runs: Sequence[dict], ceiling: bool = True) -> dict[str, Any]:
    """The reference variant learned its task and (with ``ceiling``) is not at its ceiling: mean test accuracy in
    [FLOOR, CEILING]."""
    if not runs:
        return {"passes": False, "why": "not run"}
    acc = sweep.mean_std([accuracy(r) for r in runs])
    ok = FLOOR <= acc["mean"] and (not ceiling or acc["mean"] <= CEILING)
    return {"passes": ok, "accuracy": acc, "why": f"accuracy {acc['mean']:.3f} in [{FLOOR}, "
            f"{CEILING if ceiling else 1.0}]" if ok else f"accuracy {acc['mean']:.3f} outside [{FLOOR}, "
            f"{CEILING if ceiling else 1.0}]"}


def dynamic_control(runs: Sequence[dict]) -> dict[str, Any]:
    """Dynamic routing varies the number of experts per example: off-mode fraction (:func:`off_mode`, test set)
    at least MIN_DYNAMIC in at least MIN_SEED_SHARE of the seeds."""
    if not runs:
        return {"passes": False, "why": "not run"}
    fr = [off_mode(r) for r in runs]
    k = sum(x >= MIN_DYNAMIC for x in fr)
    ok = k >= math.ceil(MIN_SEED_SHARE * len(fr) - 1e-9)
    return {"passes": ok, "off_mode_fraction": sweep.mean_std(fr), "seeds_dynamic": k, "of": len(fr),
            "why": f"off-mode fraction {sum(fr) / len(fr):.3f}, >= {MIN_DYNAMIC} in {k}/{len(fr)} seeds"}


def resolution_control(p: Mapping[str, Any] | None) -> dict[str, Any]:
    """The paired accuracy difference is resolved: its 95% interval is at most 2 * MAX_CI_HALF wide."""
    if p is None or p["ci95"] is None:
        return {"passes": False, "why": "fewer than two paired seeds"}
    half = (p["ci95"][1] - p["ci95"][0]) / 2
    return {"passes": half <= MAX_CI_HALF, "half_width": half,
            "why": f"95% CI half-width {half:.4f} {'<=' if half <= MAX_CI_HALF else '>'} {MAX_CI_HALF}"}


def gradient_control(runs: Sequence[dict]) -> dict[str, Any]:
    """Every gradient-noise measurement (all groups, all steps, all runs) is finite with a non-zero mean gradient."""
    vals = [g[k] for r in runs for p in r["grad_noise"] for g in p["groups"].values() for k in ("noise", "trace",
                                                                                                  "mean_sq_norm")]
    ok = bool(runs) and all(math.isfinite(v) and v > 0 for v in vals)
    return {"passes": ok, "why": "all measurements finite and > 0" if ok else "a non-finite or zero measurement"}


def schedule_control(runs: Sequence[dict]) -> dict[str, Any]:
    """The descending schedule is in effect: on the test set its first MoE layer uses more experts per example
    than its last, in every seed."""
    ok = bool(runs) and all(r["test_routing"]["experts_per_token"][0] > r["test_routing"]["experts_per_token"][-1]
                            for r in runs)
    return {"passes": ok, "why": "first layer > last layer in every seed" if ok else "not in every seed"}


_outcome = sweep.outcome_if_controls_pass
_ci = sweep.format_paired


def claim_a(runs_of: Callable[[str], list[dict]]) -> dict[str, Any]:
    """(a) on one dataset: test accuracy ``dyn-descending - dyn-uniform`` (primary); ``top-descending -
    top-uniform`` decides "partly"; ``dyn-ascending - dyn-uniform`` is reported beside."""
    acc = lambda x, y: accuracy(x) - accuracy(y)  # noqa: E731
    a, b = PRIMARY["a"]
    primary = paired(runs_of(a), runs_of(b), acc)
    side = {f"{x} - {y}": paired(runs_of(x), runs_of(y), acc) for x, y in SECONDARY["a"]}
    top = side["top-descending - top-uniform"]
    if primary is None:
        return {"outcome": "not run", "why": f"missing {a} or {b}"}
    controls = {"task": task_control(runs_of(b)), "dynamic": dynamic_control(runs_of(a)),
                "schedule": schedule_control(runs_of(a)), "resolution": resolution_control(primary)}

    def decide() -> str:
        if clearly_positive(primary):
            return "reproduced"
        if not clearly_negative(primary) and clearly_positive(top):
            return "partly reproduced"
        return "not reproduced"

    return {"outcome": _outcome(controls, decide), "primary": primary, "secondary": side, "controls": controls,
            "why": f"accuracy {a} - {b}: {_ci(primary)}; top-descending - top-uniform: {_ci(top)}"}


def claim_b(runs_of: Callable[[str], list[dict]]) -> dict[str, Any]:
    """(b) on one dataset: per seed, the mean over the measurement steps of log(noise dyn-uniform / noise
    top-uniform), normalised gradient noise of all parameters (primary); the same of the summed per-parameter
    variance (``trace``) decides "partly"; the descending pair, the groups and each step are reported beside."""
    a, b = PRIMARY["b"]
    primary = paired(runs_of(a), runs_of(b), mean_log_ratio("noise"))
    trace = paired(runs_of(a), runs_of(b), mean_log_ratio("trace"))
    if primary is None:
        return {"outcome": "not run", "why": f"missing {a} or {b}"}
    side: dict[str, Any] = {"trace_all": trace}
    for x, y in ((a, b),) + SECONDARY["b"]:
        for group in GROUPS:
            for stat in ("noise", "trace"):
                side[f"{stat}_{group} {x} / {y}"] = paired(runs_of(x), runs_of(y), mean_log_ratio(stat, group))
        side[f"loss_roughness {x} / {y}"] = paired(
            runs_of(x), runs_of(y),
            lambda p, q: math.log(max(loss_roughness(p), 1e-12) / max(loss_roughness(q), 1e-12)))
    controls = {"task": task_control(runs_of(b), ceiling=False), "dynamic": dynamic_control(runs_of(a)),
                "gradients": gradient_control(runs_of(a) + runs_of(b))}

    def decide() -> str:
        if clearly_negative(primary):
            return "reproduced"
        if not clearly_positive(primary) and clearly_negative(trace):
            return "partly reproduced"
        return "not reproduced"

    ratio = lambda p: f"ratio {math.exp(p['mean']):.3f}" if p else "not run"  # noqa: E731
    return {"outcome": _outcome(controls, decide), "primary": primary, "secondary": side, "controls": controls,
            "why": f"log noise ratio {a} / {b}: {_ci(primary, 3)} ({ratio(primary)}); log trace ratio: "
                   f"{_ci(trace, 3)} ({ratio(trace)})"}


def claim_c(runs_of: Callable[[str], list[dict]]) -> dict[str, Any]:
    """(c) on one dataset: ``dyn-uniform`` against ``top-uniform``: expert parameters per test example (ratio,
    per seed) and test accuracy (difference, per seed)."""
    a, b = PRIMARY["c"]
    acc = paired(runs_of(a), runs_of(b), lambda x, y: accuracy(x) - accuracy(y))
    if acc is None:
        return {"outcome": "not run", "why": f"missing {a} or {b}"}
    ratio = paired(runs_of(a), runs_of(b), lambda x, y: expert_share(x) / expert_share(y))
    limit = 1.0 - MIN_SAVING
    below = sum(v <= limit for v in ratio["per_seed"])
    saving = below >= _need(ratio) and ratio["mean"] <= limit
    non_inferior = acc["ci95"] is not None and acc["ci95"][0] > -NI_MARGIN
    side = {}
    for x, y in SECONDARY["c"]:
        side[f"accuracy {x} - {y}"] = paired(runs_of(x), runs_of(y), lambda p, q: accuracy(p) - accuracy(q))
        side[f"expert share {x} / {y}"] = paired(runs_of(x), runs_of(y), lambda p, q: expert_share(p) / expert_share(q))
    controls = {"task": task_control(runs_of(b)), "dynamic": dynamic_control(runs_of(a)),
                "resolution": resolution_control(acc)}

    def decide() -> str:
        if saving and non_inferior:
            return "reproduced"
        if saving and acc["mean"] > -NI_MARGIN:
            return "partly reproduced"
        return "not reproduced"

    return {"outcome": _outcome(controls, decide), "accuracy": acc, "share_ratio": ratio, "saving": saving,
            "seeds_saving": below, "non_inferior": non_inferior, "secondary": side, "controls": controls,
            "why": f"expert parameters per example {a} / {b}: {ratio['mean']:.3f} (<= {limit:.2f} in {below}/"
                   f"{ratio['n']} seeds); accuracy {a} - {b}: {_ci(acc)} (non-inferior at -{NI_MARGIN}: "
                   f"{'yes' if non_inferior else 'no'})"}


combine = sweep.combine_outcomes     # over model sizes / datasets (moejax.sweep)


def verdicts(runs: Sequence[dict], datasets: Sequence[str] | None = None) -> dict[str, Any]:
    """``{claim: {"verdict", "datasets": {dataset: claim_x(...)}}}`` for the registered datasets present in
    ``runs`` (all datasets of ``runs`` when ``datasets`` is None). Runs without ``test_routing`` (the superseded
    sweep) get no verdict: the rules were registered for the registered preset's records."""
    if not runs or not all("test_routing" in r for r in runs):
        return {}
    present = list(dict.fromkeys(_dataset_routing(r["variant"])[0] for r in runs))
    datasets = [d for d in (datasets or present) if d in present]
    out: dict[str, Any] = {}
    for claim, fn in (("a", claim_a), ("b", claim_b), ("c", claim_c)):
        per = {}
        for d in datasets:
            per[d] = fn(lambda routing, d=d: [r for r in runs if r["variant"] == f"{d}-{routing}"])
        out[claim] = {"claim": CLAIMS[claim], "verdict": combine([v["outcome"] for v in per.values()]),
                      "datasets": per, "paper": PAPER[claim]}
    return out


def verdict_table(summary: dict) -> str:
    """Markdown: per claim and dataset the outcome, the controls and the primary statistic, the combined verdict
    and the paper's column (the abstract gives directions only)."""
    v = summary.get("verdicts") or {}
    if not v:
        return "No verdicts: these records predate the registered rules (no per-example test routing)."
    return "\n".join(sweep.verdict_rows(v, "datasets", "dataset"))


pm = sweep.pm


def table(summary: dict) -> str:
    """Per dataset: the routing table (layers, accuracy, experts/token, gradient noise) and the paired tests."""
    variants = summary["variants"]
    lines: list[str] = []
    for dataset in summary["comparisons"]:
        rows = [(v, r) for v, r in variants.items() if _dataset_routing(v)[0] == dataset]
        steps = [p["step"] for p in rows[0][1]["grad_noise"]]
        test = all("test_expert_share" in r for _, r in rows)
        lines += [f"**{dataset}**", "",
                  "| routing | experts / max k per layer | seeds | test accuracy | experts/token per layer (train) "
                  "| expert params used per token (train) | "
                  + ("experts/token per layer (test) | expert params used per example (test) | off-mode fraction "
                     "(test) | " if test else "")
                  + " | ".join(f"noise, all, step {s}" for s in steps)
                  + " | noise router / experts, final | wall-clock per run (s) |",
                  "|---|---|---|---|---|---|" + ("---|---|---|" if test else "") + "---|" * len(steps) + "---|---|"]
        for v, r in rows:
            lay = " ".join(f"{l['num_experts']}/{l['k']}" for l in r["layers"])
            ept = " ".join(f"{e['mean']:.2f}" for e in r["experts_per_token"])
            noise = " | ".join(pm(p["all_noise"], 2) for p in r["grad_noise"])
            last = r["grad_noise"][-1]
            cells = ""
            if test:
                cells = (" ".join(f"{e['mean']:.2f}" for e in r["test_experts_per_token"])
                         + f" | {pm(r['test_expert_share'])} | {pm(r['off_mode_fraction'])} | ")
            lines.append(f"| {_dataset_routing(v)[1]} | {lay} | {','.join(map(str, r['seeds']))} | "
                         f"{pm(r['accuracy'])} | {ept} | {r['expert_flops_share']['mean']:.3f} | {cells}{noise} | "
                         f"{pm(last['router_noise'], 2)} / {pm(last['experts_noise'], 2)} | "
                         f"{r['wall_clock_s']['mean']:.0f} |")
        lines += ["", "| paired by seed | mean ± std | 95% CI | up / down | per seed |", "|---|---|---|---|---|"]
        for name, p in summary["comparisons"][dataset].items():
            if name.startswith("log_") and "_all_" not in name:
                continue
            if name.startswith("log_"):
                stat = name.split("_")[1]
                label = (name.replace(f"log_{stat}_ratio_", f"{stat} ratio (all params) ").replace("_all_", " at ")
                         .replace("dyn_over_", "dyn / "))
                vals = ", ".join(f"{math.exp(x):.2f}" for x in p["values"])
                lines.append(f"| {label} | geo-mean {p['ratio_geomean']:.2f} (log {pm(p)}) | {_ci_cell(p, 3)} | "
                             f"{p['positive']} / {p['negative']} | {vals} |")
            else:
                vals = ", ".join(f"{x:+.3f}" for x in p["values"])
                lines.append(f"| {name.replace('_', ' ')} | {p['mean']:+.3f} ± {p['std']:.3f} | {_ci_cell(p, 3)} | "
                             f"{p['positive']} / {p['negative']} | {vals} |")
        lines.append("")
    return "\n".join(lines)


def _ci_cell(p: Mapping[str, Any], digits: int) -> str:
    ci = p.get("ci95")
    return "—" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def plot_accuracy(summary: dict, path: str) -> None:
    """One panel per dataset: test accuracy (mean ± std over seeds) of every routing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["comparisons"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [(v, r) for v, r in summary["variants"].items() if _dataset_routing(v)[0] == dataset]
        names = [_dataset_routing(v)[1] for v, _ in rows]
        means = [r["accuracy"]["mean"] for _, r in rows]
        ax.bar(range(len(rows)), means, yerr=[r["accuracy"]["std"] for _, r in rows], capsize=3,
               color=["tab:blue" if n.startswith("dyn") else "tab:orange" for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        lo, hi = min(means), max(means)
        ax.set_ylim(max(lo - 2 * (hi - lo) - 0.02, 0), min(hi + (hi - lo) + 0.02, 1))
        ax.set_title(f"{dataset}: test accuracy (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_noise(summary: dict, path: str) -> None:
    """Rows: datasets; columns: parameter groups; normalised gradient noise vs training step (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["comparisons"])
    fig, axes = plt.subplots(len(datasets), len(GROUPS), figsize=(4.2 * len(GROUPS), 3.0 * len(datasets)),
                             squeeze=False)
    for row, dataset in zip(axes, datasets):
        for ax, group in zip(row, GROUPS):
            for v, r in summary["variants"].items():
                d, routing = _dataset_routing(v)
                if d != dataset:
                    continue
                steps = [p["step"] for p in r["grad_noise"]]
                mean = [p[f"{group}_noise"]["mean"] for p in r["grad_noise"]]
                std = [p[f"{group}_noise"]["std"] for p in r["grad_noise"]]
                style = "-" if routing.startswith("dyn") else "--"
                width = 2.0 if routing.endswith(("uniform", "descending")) else 0.8
                ax.errorbar(steps, mean, yerr=std, fmt=style, lw=width, capsize=2, label=routing)
            ax.set_yscale("log")
            ax.set_xlabel("training step", fontsize=8)
            ax.set_title(f"{dataset}: {group} params", fontsize=9)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("mean ||g_i - g||² / ||g||²", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
