"""Aggregation, markdown tables and plots of the DynaMoE sweep (run.py writes the per-run JSONs).

Spread is the sample standard deviation (ddof=1) over seeds. The comparisons behind the verdicts are paired by
seed (same ``config.seed`` and data order): ``descending - uniform`` accuracy, and ``dynamic / fixed``
normalised gradient noise (``noise``) and summed per-parameter variance (``trace``) at each measurement step,
each reported as mean ± std over the seeds and with the
number of seeds in which the sign is the claimed one.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from moejax import sweep

GROUPS = ("all", "router", "experts")


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
    return {"variants": variants, "comparisons": comparisons}


def _active_share(run: dict) -> float:
    """Expert parameters used per token / expert parameters of the whole model (all experts are equal-sized)."""
    return sum(run["experts_per_token_train"]["mean"]) / sum(l["num_experts"] for l in run["layers"])


def _paired(a: Sequence[dict], b: Sequence[dict], value, op) -> dict[str, Any] | None:
    """``op(value(a_seed), value(b_seed))`` over the seeds both have: mean ± std, the values, and the seeds."""
    bs = {r["seed"]: r for r in b}
    vals = [op(value(r), value(bs[r["seed"]])) for r in a if r["seed"] in bs]
    if not vals:
        return None
    return {**sweep.mean_std(vals), "values": vals, "n": len(vals)}


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


pm = sweep.pm


def table(summary: dict) -> str:
    """Per dataset: the routing table (layers, accuracy, experts/token, gradient noise) and the paired tests."""
    variants = summary["variants"]
    lines: list[str] = []
    for dataset in summary["comparisons"]:
        rows = [(v, r) for v, r in variants.items() if _dataset_routing(v)[0] == dataset]
        steps = [p["step"] for p in rows[0][1]["grad_noise"]]
        lines += [f"**{dataset}**", "",
                  "| routing | experts / max k per layer | seeds | test accuracy | experts/token per layer (train) "
                  "| expert params used per token | " + " | ".join(f"noise, all, step {s}" for s in steps)
                  + " | noise router / experts, final | wall-clock per run (s) |",
                  "|---|---|---|---|---|---|" + "---|" * len(steps) + "---|---|"]
        for v, r in rows:
            lay = " ".join(f"{l['num_experts']}/{l['k']}" for l in r["layers"])
            ept = " ".join(f"{e['mean']:.2f}" for e in r["experts_per_token"])
            noise = " | ".join(pm(p["all_noise"], 2) for p in r["grad_noise"])
            last = r["grad_noise"][-1]
            lines.append(f"| {_dataset_routing(v)[1]} | {lay} | {','.join(map(str, r['seeds']))} | "
                         f"{pm(r['accuracy'])} | {ept} | {r['expert_flops_share']['mean']:.3f} | {noise} | "
                         f"{pm(last['router_noise'], 2)} / {pm(last['experts_noise'], 2)} | "
                         f"{r['wall_clock_s']['mean']:.0f} |")
        lines += ["", "| paired by seed | mean ± std | per seed |", "|---|---|---|"]
        for name, p in summary["comparisons"][dataset].items():
            if name.startswith("log_") and "_all_" not in name:
                continue
            if name.startswith("log_"):
                stat = name.split("_")[1]
                label = (name.replace(f"log_{stat}_ratio_", f"{stat} ratio (all params) ").replace("_all_", " at ")
                         .replace("dyn_over_", "dyn / "))
                vals = ", ".join(f"{math.exp(x):.2f}" for x in p["values"])
                lines.append(f"| {label} | geo-mean {p['ratio_geomean']:.2f} (log {pm(p)}) | {vals} |")
            else:
                vals = ", ".join(f"{x:+.3f}" for x in p["values"])
                lines.append(f"| {name.replace('_', ' ')} | {p['mean']:+.3f} ± {p['std']:.3f} | {vals} |")
        lines.append("")
    return "\n".join(lines)


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
