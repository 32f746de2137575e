"""The MC-SMoE sweep: train a 16-expert LM per seed, merge, fine-tune, compress -> results/<preset>/*.json, verdicts.

nice -n 10 python experiments/mc_smoe/run.py --preset=full --threads=1 [--seeds=0,1]
python experiments/mc_smoe/run.py --preset=full --table          # tables and verdicts of the results on disk

Per seed: the library's trainer trains ``config.py``'s model; then, on its final checkpoint
(``merge_compress.py`` for the details):

1. calibration on ``calib_batches`` training batches: routing frequencies and router-logit similarities;
2. for every G of ``groups`` and every method of ``config.METHODS``: merge every MoE layer to G experts, evaluate in
   both router forms (``bound``, the paper's; ``drop``, the library's), and fine-tune the primary form (``drop`` for
   ``prune``, ``bound`` otherwise) with the authors' recipe (router frozen, KD from the unmerged model);
3. the fine-tuned M-SMoE model of each G compressed (``low_rank``, ``shared_basis`` at each of ``ranks``), evaluated,
   fine-tuned again in factorised form, evaluated;
4. the unmerged model fine-tuned twice with the same recipe (the control of steps 2 and 3: a merged model is
   compared with the unmerged one after the same number of fine-tuning steps).

Every evaluation is the mean next-byte cross-entropy (nats/byte) on the same first ``train.eval_steps``
validation batches. A persistent compilation cache (``--compile_cache``) lets later seeds reuse compiled programs.
A run whose JSON exists is skipped.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Callable

import numpy as np

# This checkout's moejax, not whichever one an editable install points to: the code that runs must be the code
# whose commit the record names (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

# The thresholds of the pre-registered decision rules (README.md, "Decision rules"), named once.
MIN_SEEDS = 4                 # of 5: a direction must hold in at least this many seeds
NO_LOSS_MEAN = 0.01           # "virtually no loss": mean relative loss increase at most 1% ...
NO_LOSS_MAX = 0.02            # ... and at most 2% in every seed
MEMORY_TARGET, FLOPS_TARGET = 0.80, 0.20   # the abstract's "80% memory and a 20% FLOPs reduction"
MEMORY_PARTLY = 0.50          # "partly": virtually no loss at half the memory or less


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("mc_smoe", __doc__.splitlines()[0], compile_cache=True)
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "mc_smoe", name)


def surgery(config, state: dict, settings: dict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-4 of the module docstring on one trained model; returns the record's surgery fields."""
    import jax

    from moejax import data as data_lib
    from moejax.models import build_model, model_config

    mc = load_sibling("merge_compress")
    config_lib = load_sibling("config")
    pipeline = data_lib.from_config(config.data)
    vocab = pipeline.meta.vocab_size
    typed = model_config(config.model, vocab_size=vocab)
    model = build_model(typed)
    moe_state = {k: v for k, v in state["moe_state"].items()}
    variables = {"params": state["params"], **moe_state}
    params = variables["params"]
    eval_batches = [b for _, b in zip(range(int(config.train.eval_steps)), pipeline.eval)]
    train_batch = pipeline.train.batch
    steps = int(config.train.steps)
    ft = settings["finetune"]
    ft_steps = int(ft["steps"])
    e, d, f, k = typed.moe.num_experts, typed.d_model, typed.moe.hidden_dim, typed.moe.router.k
    paths = mc.moe_paths(typed)
    losses = {}

    def loss_fn_for(cfg) -> Callable:
        key = cfg.moe.num_experts
        if key not in losses:
            losses[key] = sweep.lm_loss_fn(build_model(cfg))
        return losses[key]

    base_loss = loss_fn_for(typed)
    total = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    experts_per_layer = int(sum(np.size(w) for w in mc.get_in(params, (*paths[0].split("/"), "experts")).values()))
    flops = {"full": mc.flops_per_token(d, len(paths), config.data.seq_len, vocab, e, f, k)}

    def account(expert_params: int, dropped_columns: int, router_outputs: int, kind: str = "dense",
                rank: int | None = None) -> dict[str, Any]:
        stored = mc.stored_params(total, len(paths), experts_per_layer, expert_params, dropped_columns, d)
        fl = mc.flops_per_token(d, len(paths), config.data.seq_len, vocab, router_outputs, f, k, kind, rank)
        return {"params": stored, "memory_reduction": 1 - stored / total, "flops": fl,
                "flops_reduction": 1 - fl / flops["full"]}

    t0 = time.perf_counter()
    calib = mc.calibrate(model, variables, [train_batch(i) for i in range(settings["calib_batches"])], e)
    out: dict[str, Any] = {"surgery_settings": settings, "calibration": calib.to_json(),
                           "full": {"loss": base_loss(variables, eval_batches),
                                    **account(experts_per_layer * len(paths), 0, e)}}

    # 4. the control: the unmerged model fine-tuned once (and twice, when compressions are fine-tuned again).
    full_p = mc.Parameterised.build(params, {p: mc.get_in(params, (*p.split("/"), "experts")) for p in paths},
                                    {p: np.arange(e) for p in paths})
    controls = [mc.finetune(model, model, variables, moe_state, full_p, train_batch, steps, ft)]
    if settings["finetune_compressed"]:
        controls.append(mc.finetune(model, model, variables, moe_state, controls[0], train_batch,
                                    steps + ft_steps, ft))
    out["full"]["finetuned"] = [base_loss({**moe_state, "params": p.params()}, eval_batches) for p in controls]
    log(f"  full {out['full']['loss']:.4f}, fine-tuned {out['full']['finetuned']} "
        f"({time.perf_counter() - t0:.0f} s)")

    out["merge"], out["compress"] = {}, {}
    for groups in settings["groups"]:
        row: dict[str, Any] = {}
        msmoe_src = None
        for method in config_lib.METHODS:
            merged = mc.merge_all(params, paths, calib, groups, method)
            entry: dict[str, Any] = {"assignment": merged.assignments()}
            forms = {}
            for form in ("bound", "drop"):
                cfg_f, vars_f = mc.merged_variables(typed, variables, merged, form)
                forms[form] = (cfg_f, vars_f)
                entry[form] = loss_fn_for(cfg_f)(vars_f, eval_batches)
            primary = "drop" if method == "prune" else "bound"
            entry["primary_form"] = primary
            g_experts = int(sum(np.size(w) for r in merged.layers.values() for w in r.experts.values()))
            entry.update(account(g_experts, (e - groups) * len(paths) if primary == "drop" else 0,
                                 groups if primary == "drop" else e))
            cfg_p, vars_p = forms[primary]
            index = {p: (np.asarray(r.assignment) if primary == "bound" else np.arange(groups))
                     for p, r in merged.layers.items()}
            param = mc.Parameterised.build(vars_p["params"], {p: r.experts for p, r in merged.layers.items()}, index)
            if method in settings["finetune_methods"]:
                student = build_model(cfg_p)
                param = mc.finetune(student, model, variables, moe_state, param, train_batch, steps, ft)
                entry["finetuned"] = loss_fn_for(cfg_p)({**moe_state, "params": param.params()}, eval_batches)
            if method == "msmoe":
                msmoe_src = param
            row[method] = entry
            log(f"  G={groups} {method}: bound {entry['bound']:.4f} drop {entry['drop']:.4f}"
                + (f" fine-tuned {entry['finetuned']:.4f}" if "finetuned" in entry else "")
                + f" ({time.perf_counter() - t0:.0f} s)")
        out["merge"][str(groups)] = row

        # 3. compress the (fine-tuned) M-SMoE experts.
        comp: dict[str, Any] = {}
        base_params, g_experts, index = msmoe_src.params(), msmoe_src.experts(), msmoe_src.index
        for kind in settings["compressions"]:
            for rank in settings["ranks"]:
                c = mc.Parameterised.build(base_params, g_experts, index, kind, rank)
                entry = {"kind": kind, "rank": rank, "loss": base_loss({**moe_state, "params": c.params()},
                                                                       eval_batches),
                         **account(c.num_expert_params(), 0, e, kind, rank)}
                if settings["finetune_compressed"]:
                    c = mc.finetune(model, model, variables, moe_state, c, train_batch, steps + ft_steps, ft)
                    entry["finetuned"] = base_loss({**moe_state, "params": c.params()}, eval_batches)
                comp[f"{kind}-{rank}"] = entry
                log(f"  G={groups} {kind} r={rank}: {entry['loss']:.4f}"
                    + (f" fine-tuned {entry['finetuned']:.4f}" if "finetuned" in entry else "")
                    + f", memory -{entry['memory_reduction']:.1%}, FLOPs -{entry['flops_reduction']:.1%}"
                    + f" ({time.perf_counter() - t0:.0f} s)")
        out["compress"][str(groups)] = comp
    out["surgery_wall_clock_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)
    import json

    from moejax.training.metrics import to_python

    config_lib = load_sibling("config")
    if args.preset == "pilot":
        args.results = args.results or str(REPO / "experiments" / "mc_smoe" / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        summary = summarize(sweep.load_runs(results, config_lib.VARIANTS))
        print(report(summary))
        return summary
    command = sweep.command_line(__file__, argv)
    settings = config_lib.surgery_settings(args.preset)

    def measure(config, state, final, variant, seed) -> dict:
        print(f"{variant} seed {seed}: trained, val loss {float(final['loss']):.4f}; surgery", flush=True)
        return {"final_eval": {k: to_python(v) for k, v in final.items()}, **surgery(config, state, settings)}

    runs = sweep.run_all(args, "mc_smoe", config_lib, variants, seeds, results, command, measure)
    runs = sweep.load_runs(results, config_lib.VARIANTS)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report(summary) + "\n")
    print(report(summary))
    return summary


# ----------------------------------------------------------------------------- summary and decision rules

def _finetuned_or_loss(entry: dict) -> tuple[float, int]:
    """(a merge entry's loss after its fine-tuning, or in its primary form when it was not fine-tuned; the
    number of fine-tunings it had)."""
    return (entry["finetuned"], 1) if "finetuned" in entry else (entry[entry["primary_form"]], 0)


def _control(run: dict, fine_tunings: int) -> float:
    """The unmerged model's loss after the same number of fine-tunings (0, 1 or 2)."""
    return run["full"]["loss"] if fine_tunings == 0 else run["full"]["finetuned"][fine_tunings - 1]


def summarize(runs: list[dict]) -> dict:
    """Mean ± std over seeds of every loss; the per-seed comparisons of the rules; the verdicts."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "full": {}, "merge": {}, "compress": {}}
    if not runs:
        return out
    out["full"] = {"loss": sweep.mean_std([r["full"]["loss"] for r in runs]),
                   "finetuned": [sweep.mean_std([r["full"]["finetuned"][i] for r in runs])
                                 for i in range(len(runs[0]["full"]["finetuned"]))],
                   "params": runs[0]["full"]["params"], "flops": runs[0]["full"]["flops"],
                   "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in runs])}
    for g, row in runs[0]["merge"].items():
        out["merge"][g] = {}
        for method, entry in row.items():
            cell = {form: sweep.mean_std([r["merge"][g][method][form] for r in runs]) for form in ("bound", "drop")}
            cell["primary_form"] = entry["primary_form"]
            for key in ("params", "memory_reduction", "flops", "flops_reduction"):
                cell[key] = entry[key]
            if "finetuned" in entry:
                cell["finetuned"] = sweep.mean_std([r["merge"][g][method]["finetuned"] for r in runs])
                cell["increase_finetuned"] = sweep.mean_std(
                    [r["merge"][g][method]["finetuned"] - _control(r, 1) for r in runs])
            cell["increase_unfinetuned"] = sweep.mean_std(
                [r["merge"][g][method][entry["primary_form"]] - r["full"]["loss"] for r in runs])
            out["merge"][g][method] = cell
    for g, row in runs[0]["compress"].items():
        out["compress"][g] = {}
        for name, entry in row.items():
            n_ft = 2 if "finetuned" in entry else 0     # merge fine-tuning + compression fine-tuning
            cell = {key: entry[key] for key in ("kind", "rank", "params", "memory_reduction", "flops",
                                                "flops_reduction")}
            cell["loss"] = sweep.mean_std([r["compress"][g][name]["loss"] for r in runs])
            if n_ft:
                cell["finetuned"] = sweep.mean_std([r["compress"][g][name]["finetuned"] for r in runs])
            out["compress"][g][name] = cell
    out["verdicts"] = verdicts(runs)
    return out


MERGING_COSTS = 0.01           # nats/byte: the control of claim 1, merging to G must cost at least this somewhere


def paired(runs: list[dict], a: Callable[[dict], float], b: Callable[[dict], float]) -> dict[str, Any]:
    """``a(run) - b(run)`` per seed: the values, mean ± std, 95% interval, and in how many seeds a < b."""
    diffs = [a(r) - b(r) for r in runs]
    return {"per_seed": diffs, **sweep.mean_std(diffs), "ci95": sweep.ci95(diffs), "a_lower": sum(d < 0 for d in diffs),
            "seeds": [r["seed"] for r in runs]}


def merging_verdict(runs: list[dict], finetuned: bool) -> dict[str, Any]:
    """Claim 1 ("conventional model merging methods fail to be effective in such expert merging") under the
    pre-registered rule, on the fine-tuned models (primary) or before fine-tuning (secondary).

    Controls (a failed one gives "not testable here"): every MoE layer routes the calibration tokens to at least
    G distinct experts (otherwise grouping is degenerate); and at a given G merging is not free: some method's
    mean loss increase before fine-tuning is at least ``MERGING_COSTS`` (a G where nothing costs anything cannot
    rank methods and is left out)."""
    need = min(MIN_SEEDS, len(runs))

    def loss(method: str, g: str) -> Callable[[dict], float]:
        def get(r: dict) -> float:
            e = r["merge"][g][method]
            return e["finetuned"] if finetuned else e[e["primary_form"]]
        return get

    def unfinetuned_increase(method: str, g: str) -> float:
        return float(np.mean([r["merge"][g][method][r["merge"][g][method]["primary_form"]] - r["full"]["loss"]
                              for r in runs]))

    per_g, why = {}, []
    for g in runs[0]["merge"]:
        if finetuned and any("finetuned" not in runs[0]["merge"][g][m] for m in ("msmoe", "average", "prune")):
            return {"verdict": "not run", "why": "the fine-tuned baselines are missing (tiny preset?)"}
        used = min(int(np.sum(np.asarray(f) > 0)) for r in runs for f in r["calibration"]["frequency"].values())
        cost = max(unfinetuned_increase(m, g) for m in runs[0]["merge"][g])
        cmp = {"msmoe_minus_average": paired(runs, loss("msmoe", g), loss("average", g)),
               "average_minus_prune": paired(runs, loss("average", g), loss("prune", g)),
               "msmoe_minus_frequency": paired(runs, loss("msmoe", g), loss("frequency", g)),
               "frequency_minus_average": paired(runs, loss("frequency", g), loss("average", g)),
               # Reported, not deciding (added after the pilot, which showed pruning ahead of M-SMoE).
               "msmoe_minus_prune": paired(runs, loss("msmoe", g), loss("prune", g))}
        a, b = cmp["msmoe_minus_average"]["a_lower"], cmp["average_minus_prune"]["a_lower"]
        align, weight = cmp["msmoe_minus_frequency"]["a_lower"], cmp["frequency_minus_average"]["a_lower"]
        per_g[g] = {"comparisons": cmp, "controls": {"min_experts_used": used, "largest_unfinetuned_increase": cost,
                                                     "passed": used >= int(g) and cost >= MERGING_COSTS},
                    "msmoe_beats_average": a >= need, "average_ineffective": b < need,
                    "alignment_helps": align >= need, "frequency_weighting_helps": weight >= need}
        why.append(f"G={g}: M-SMoE < average in {a}, average < prune in {b}, M-SMoE < frequency in {align}, "
                   f"frequency < average in {weight} of {len(runs)} seeds; control "
                   f"{'passed' if per_g[g]['controls']['passed'] else 'FAILED'} (experts used >= {used}, "
                   f"largest unfine-tuned increase {cost:+.4f})")
    deciding = [p for p in per_g.values() if p["controls"]["passed"]]
    a_all = [p["msmoe_beats_average"] for p in deciding]
    b_all = [p["average_ineffective"] for p in deciding]
    if not deciding:
        verdict = "not testable here"
    elif all(a_all) and all(b_all):
        verdict = "reproduced"
    elif any(a_all):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    return {"verdict": verdict, "groups": per_g, "why": "; ".join(why)}


def compression_verdict(runs: list[dict]) -> dict[str, Any]:
    """Claim 2 ("up to 80% memory and a 20% FLOPs reduction, with virtually no loss in performance") under the
    pre-registered rule, over every fine-tuned M-SMoE model (merged only, and merged then compressed)."""
    configs = []
    for g in runs[0]["merge"]:
        configs.append((f"G={g} msmoe", lambda r, g=g: (r["merge"][g]["msmoe"], 1)))
        for name in runs[0]["compress"].get(g, {}):
            configs.append((f"G={g} msmoe + {name}",
                            lambda r, g=g, name=name: (r["compress"][g][name],
                                                       2 if "finetuned" in r["compress"][g][name] else 0)))
    rows = []
    for label, get in configs:
        rel = []
        for r in runs:
            entry, n_ft = get(r)
            if n_ft == 1 and "finetuned" not in entry:
                n_ft = 0
            value = entry["finetuned"] if n_ft else entry.get("loss", entry.get("bound"))
            control = _control(r, n_ft)
            rel.append((value - control) / control)
        entry0, _ = get(runs[0])
        no_loss = float(np.mean(rel)) <= NO_LOSS_MEAN and max(rel) <= NO_LOSS_MAX
        rows.append({"config": label, "relative_increase_mean": float(np.mean(rel)),
                     "relative_increase_max": float(max(rel)), "virtually_no_loss": no_loss,
                     "memory_reduction": entry0["memory_reduction"], "flops_reduction": entry0["flops_reduction"]})
    ok = [x for x in rows if x["virtually_no_loss"]]
    target = [x for x in ok if x["memory_reduction"] >= MEMORY_TARGET and x["flops_reduction"] >= FLOPS_TARGET]
    # Control: the "virtually no loss" threshold must discriminate at this scale: pruning to the smallest G
    # (75% of the experts discarded) must not pass it, else any crude reduction would.
    g_min = min(runs[0]["merge"], key=int)
    prune_rel = [(_finetuned_or_loss(r["merge"][g_min]["prune"])[0]
                  - _control(r, _finetuned_or_loss(r["merge"][g_min]["prune"])[1]))
                 / _control(r, _finetuned_or_loss(r["merge"][g_min]["prune"])[1]) for r in runs]
    control = {"prune_relative_increase_mean": float(np.mean(prune_rel)), "G": int(g_min),
               "passed": float(np.mean(prune_rel)) > NO_LOSS_MEAN}
    if not control["passed"]:
        verdict = "not testable here"
    elif target:
        verdict = "reproduced"
    elif any(x["memory_reduction"] >= MEMORY_PARTLY for x in ok):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    best = max(ok, key=lambda x: x["memory_reduction"], default=None)
    why = ("no configuration with virtually no loss" if best is None else
           f"largest memory reduction with virtually no loss: {best['config']} (-{best['memory_reduction']:.1%} "
           f"memory, -{best['flops_reduction']:.1%} FLOPs, loss {best['relative_increase_mean']:+.2%})")
    why += (f"; control {'passed' if control['passed'] else 'FAILED'}: pruning to G={g_min} "
            f"{control['prune_relative_increase_mean']:+.2%}")
    return {"verdict": verdict, "configs": rows, "control": control, "why": why}


def verdicts(runs: list[dict]) -> dict[str, Any]:
    return {"claim1_merging": merging_verdict(runs, finetuned=True),
            "claim1_secondary_without_finetuning": merging_verdict(runs, finetuned=False),
            "claim2_compression": compression_verdict(runs)}


def table(summary: dict) -> str:
    """Markdown: the full model, every merge (both router forms, fine-tuned) and every compression."""
    pm = lambda s: sweep.pm(s, 4)   # noqa: E731
    full = summary["full"]
    rows = ["| model | router form | stored params | memory (of full) | FLOPs/token | loss, no fine-tuning | "
            "loss, fine-tuned | "
            "increase vs unmerged (same fine-tuning) |", "|---|---|---|---|---|---|---|---|"]
    ft = " / ".join(pm(x) for x in full["finetuned"])
    rows.append(f"| full (16 experts) | — | {full['params']:,} | 100% | {full['flops']:,} | {pm(full['loss'])} | "
                f"{ft} (once / twice) | — |")
    for g, row in summary["merge"].items():
        for method, c in row.items():
            other = "drop" if c["primary_form"] == "bound" else "bound"
            inc = (pm(c["increase_finetuned"]) if "increase_finetuned" in c
                   else pm(c["increase_unfinetuned"]) + " (no FT)")
            rows.append(f"| G={g} {method} | {c['primary_form']} (other form: {pm(c[other])}) | {c['params']:,} | "
                        f"{1 - c['memory_reduction']:.1%} | {c['flops']:,} | {pm(c[c['primary_form']])} | "
                        f"{pm(c['finetuned']) if 'finetuned' in c else '—'} | {inc} |")
        for name, c in summary["compress"].get(g, {}).items():
            rows.append(f"| G={g} msmoe + {name} | bound | {c['params']:,} | {1 - c['memory_reduction']:.1%} | "
                        f"{c['flops']:,} ({-c['flops_reduction']:+.1%}) | {pm(c['loss'])} | "
                        f"{pm(c['finetuned']) if 'finetuned' in c else '—'} | see verdict rows |")
    return "\n".join(rows)


def comparisons_table(summary: dict) -> str:
    """Markdown: claim 1's paired comparisons (after / before fine-tuning) and claim 2's candidate configurations."""
    rows = ["| G | fine-tuned | a - b (paired by seed) | mean ± std | 95% interval of the mean | seeds with a < b |",
            "|---|---|---|---|---|---|"]
    for key, ft in (("claim1_merging", "yes"), ("claim1_secondary_without_finetuning", "no")):
        for g, p in summary["verdicts"][key].get("groups", {}).items():
            for name, c in p["comparisons"].items():
                ci = "—" if c["ci95"] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                rows.append(f"| {g} | {ft} | {name.replace('_minus_', ' - ')} | {sweep.pm(c, 4)} | {ci} | "
                            f"{c['a_lower']}/{len(c['seeds'])} |")
    rows += ["", "| configuration (after its fine-tuning) | memory reduction | FLOPs reduction | loss vs unmerged "
                 "control, mean | worst seed | virtually no loss |", "|---|---|---|---|---|---|"]
    for c in summary["verdicts"]["claim2_compression"]["configs"]:
        rows.append(f"| {c['config']} | {c['memory_reduction']:.1%} | {c['flops_reduction']:.1%} | "
                    f"{c['relative_increase_mean']:+.2%} | {c['relative_increase_max']:+.2%} | "
                    f"{'yes' if c['virtually_no_loss'] else 'no'} |")
    return "\n".join(rows)


def report(summary: dict) -> str:
    if not summary.get("full"):
        return "no results"
    lines = [table(summary), "", comparisons_table(summary), ""]
    for claim, v in summary["verdicts"].items():
        lines.append(f"- {claim}: **{v['verdict']}** ({v.get('why', '')})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
