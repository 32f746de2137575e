"""The deep-MoE sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md, plots; rules applied.

nice -n 10 python experiments/deep_moe/run.py --preset=full --threads=1 [--variants=dense,top1] [--seeds=0,1]
python experiments/deep_moe/run.py --preset=full --table          # tables and verdicts of the results on disk
python experiments/deep_moe/run.py --preset=full --untrained_only --seeds=0,1 --threads=1   # the pilot: no training

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir,
restores the final checkpoint and measures the gating of both MoE layers on the test split (analysis.py). The
same measurement is made on the *untrained* model of the run, the trainer's own step-0 state for that config and
seed (:func:`untrained_variables`), and stored beside it (``gating_untrained``), so that every trained number has
its control: what training changed is ``trained - untrained``, paired by seed. A run whose JSON already exists is
skipped, so a killed sweep continues where it stopped. ``--preset=full`` refuses a tree with uncommitted changes
(``--allow_dirty`` for a trial).

The decision rules of README.md ("Decision rule") are the functions :func:`factor_outcome`, :func:`controls` and
:func:`verdicts` below, with every threshold named once here.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import Any, Sequence

# This checkout's moejax, not whichever one an editable install points to: the code that runs must be the code
# whose commit the record names (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

# ---- The decision rule (README.md, "Decision rule"): every threshold, named once. ----
MI_KEY = "routed_corrected"    # the statistic: shuffle-corrected routed MI I(routing; label), bits (analysis.py)
FLOOR_KEY = "routed_null_std"  # its noise: the std of the routed MI over label shuffles, bits
MIN_SEED_SHARE = 0.8           # a direction must hold in at least ceil(0.8 n) seeds: 4 of 5
MIN_EFFECT = 0.02              # bits (1% of the 2-bit maximum): a per-seed change must exceed this ...
FLOOR_SIGMAS = 2.0             # ... and 2 shuffle stds of a difference, 2 sqrt(sd_untrained^2 + sd_trained^2)
MAX_FLOOR = 0.05               # bits: control, the estimator resolves the changes the rule asks about
MIN_ACCURACY = 0.5             # control: training worked (chance is 0.1)
MIN_USAGE = 0.05               # control: every expert is the top-1 choice of >= 5% of test examples (no collapse)
PRIMARY = "dense"              # the paper's dense mixture decides; top2 and top1 are reported beside it
# factor -> (layer, the label it is about, the label it is contrasted with)
FACTORS = {"where": (1, "position", "class"), "what": (2, "class", "position")}
LABELS = ("quadrant", "position", "class")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("deep_moe", __doc__.splitlines()[0])
    p.add_argument("--untrained_only", action="store_true",
                   help="no training: only the gating analysis of each run's step-0 model (the pilot); "
                        "results default to experiments/deep_moe/pilot/untrained_<preset>/")
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "deep_moe", name)


def untrained_variables(config) -> dict:
    """The variables ``{'params': ..., **moe_state}`` of the trainer's step-0 state for ``config``.

    This is the state ``train_and_evaluate`` builds before its first step (``loop.initial_state``): the exact
    starting point of the trained run.
    """
    from moejax.training import loop
    state = loop.initial_state(config)
    return {"params": state.params, **state.moe_state}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.untrained_only:
        # A pilot writes to pilot/, never to results/<preset>: it is a trial by definition (its JSONs record
        # the tree's state), so the refusal of a dirty tree does not apply to it.
        args.results = args.results or str(REPO / "experiments" / "deep_moe" / "pilot" / f"untrained_{args.preset}")
        args.allow_dirty = True
    sweep.start(args)       # one XLA thread; refuses a dirty tree for --preset=full (before jax starts)
    import json

    import jax
    import numpy as np

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts

    analysis = load_sibling("analysis")
    config_lib = load_sibling("config")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        runs = sweep.load_runs(results, config_lib.VARIANTS)
        if args.untrained_only:
            print(untrained_table(runs))
            return {"runs": runs}
        summary = summarize(runs)
        print(table(summary))
        return summary
    command = sweep.command_line(__file__, argv)
    cache: dict = {}

    def test_split(config) -> dict:
        if "test" not in cache:
            cache["test"] = data_lib.materialize(data_lib.load_split(config.data.name, "test", config.data.data_dir),
                                                 ("image", "label", "position", "position_class")).columns
        return cache["test"]

    def labels(test) -> dict:
        return {"quadrant": (test["position_class"], 4), "position": analysis.position_ids(test["position"]),
                "class": (test["label"], 10)}

    def analyse(config, variables, key: str) -> dict:
        test = test_split(config)
        model = build_model(config.model, num_classes=10, input_shape=test["image"].shape[1:])
        gates = cache[key] = analysis.gate_distributions(model, variables, test["image"])
        ks = [layer["router"]["k"] for layer in config.model.layers]
        return {"gating": analysis.gating_summary(gates, labels(test), ks=ks),
                "accuracy": analysis.accuracy(model, variables, test["image"], test["label"]), "model": model}

    def untrained(config) -> dict:
        out = analyse(config, untrained_variables(config), "gates_untrained")
        return {"gating_untrained": out["gating"], "untrained_eval": {"accuracy": out["accuracy"]}}

    def measure(config, state, final, variant, seed) -> dict:
        trained = analyse(config, {"params": state["params"], **state["moe_state"]}, "gates")
        test = test_split(config)
        counts = param_counts(trained["model"], jax.ShapeDtypeStruct((1, *test["image"].shape[1:]), np.float32))
        return {
            "final_eval": {k: v for k, v in final.items() if k != "expert_load"},
            "gating": trained["gating"],
            # the analysed model's own test accuracy: equal to final_eval's when it is the model the trainer ran
            "analysis_accuracy": trained["accuracy"],
            **untrained(config),
            "params": {"total": counts.total, "active": counts.active},
        }

    def describe(gating: list[dict]) -> str:
        return "; ".join(f"layer {i + 1} routed MI quadrant {g['mi_quadrant_routed_corrected']:.3f} position "
                         f"{g['mi_position_routed_corrected']:.3f} class {g['mi_class_routed_corrected']:.3f}"
                         for i, g in enumerate(gating))

    def after(record: dict, workdir) -> None:
        test, variant, seed = cache["test"], record["variant"], record["seed"]
        accuracy = record["final_eval"]["accuracy"]
        if seed == seeds[0]:
            analysis.plot_gating(cache["gates"], test["position"], test["label"],
                                 str(results / f"gating_{variant}.png"),
                                 f"deep MoE, {variant}, seed {seed}, test accuracy {accuracy:.3f}")
            analysis.plot_gating(cache["gates_untrained"], test["position"], test["label"],
                                 str(results / f"gating_{variant}_untrained.png"),
                                 f"deep MoE, {variant}, seed {seed}, UNTRAINED (step 0)")
        # to re-analyse without retraining
        np.savez_compressed(workdir / "test_gates.npz", *cache["gates"])
        np.savez_compressed(workdir / "test_gates_untrained.npz", *cache["gates_untrained"])
        print(f"{variant} seed {seed}: accuracy {accuracy:.4f}, trained: {describe(record['gating'])}; "
              f"untrained: {describe(record['gating_untrained'])} ({record['wall_clock_s']:.0f} s)", flush=True)

    if args.untrained_only:
        runs = untrained_sweep(args, config_lib, variants, seeds, results, command, untrained, describe)
        text = untrained_table(runs)
        (results / "table.md").write_text(text + "\n")
        print(text)
        return {"runs": runs}
    runs = sweep.run_all(args, "deep_moe", config_lib, variants, seeds, results, command, measure, after)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(table(summary) + "\n")
    print(table(summary))
    return summary


def untrained_sweep(args, config_lib, variants, seeds, results, command, untrained, describe) -> list[dict]:
    """The pilot: for each (variant, seed) only :func:`untrained_variables`' gating, one JSON per run."""
    import json
    import time

    import jax
    from moejax.training.loop import to_jsonable
    host, code = sweep.machine(), sweep.code_version()
    runs = []
    for variant in variants:
        for seed in seeds:
            out = results / f"{variant}_seed{seed}.json"
            if out.exists():
                runs.append(json.loads(out.read_text()))
                continue
            config = config_lib.get_config(f"{args.preset},{variant}")
            config.seed = config.data.seed = seed
            start = time.perf_counter()
            record = {"experiment": "deep_moe", "preset": args.preset, "variant": variant, "seed": seed,
                      "untrained_only": True, **untrained(config), "wall_clock_s": time.perf_counter() - start,
                      "jax_version": jax.__version__, "machine": host, "code": code, "command": command,
                      "config": to_jsonable(config)}
            out.write_text(json.dumps(record, indent=2))
            print(f"{variant} seed {seed} untrained: accuracy {record['untrained_eval']['accuracy']:.3f}; "
                  f"{describe(record['gating_untrained'])}", flush=True)
            runs.append(record)
    return runs


# ---- Statistics and the decision rule: pure functions of the run records (tested on synthetic records). ----

def mi(record: dict, state: str, layer: int, label: str, key: str = MI_KEY) -> float:
    """``mi_<label>_<key>`` of 1-based ``layer`` in ``state`` ('trained' or 'untrained') of one run record."""
    gating = record["gating" if state == "trained" else "gating_untrained"]
    return float(gating[layer - 1][f"mi_{label}_{key}"])


def change(record: dict, layer: int, label: str) -> float:
    """trained - untrained of the statistic, one seed."""
    return mi(record, "trained", layer, label) - mi(record, "untrained", layer, label)


def floor(record: dict, layer: int, label: str) -> float:
    """The per-seed threshold of a change: max(MIN_EFFECT, FLOOR_SIGMAS x the shuffle std of a difference)."""
    sd = math.hypot(mi(record, "trained", layer, label, FLOOR_KEY), mi(record, "untrained", layer, label, FLOOR_KEY))
    return max(MIN_EFFECT, FLOOR_SIGMAS * sd)


def min_seeds(n: int) -> int:
    return math.ceil(MIN_SEED_SHARE * n - 1e-9)


def paired(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed differences: mean, std (ddof=1), 95% t-interval of the mean, seeds up / down / tied, values."""
    vals = [float(v) for v in values]
    return {**sweep.mean_std(vals), "ci95": sweep.ci95(vals), "n": len(vals), "up": sum(v > 0 for v in vals),
            "down": sum(v < 0 for v in vals), "values": vals}


def factor_outcome(runs: Sequence[dict], factor: str) -> dict[str, Any]:
    """One variant's runs (one record per seed, each with ``gating`` and ``gating_untrained``) -> the outcome of
    ``factor`` ('where': layer 1 about position rather than class; 'what': layer 2 about class rather than
    position) and the evidence.

    Per seed s, with T the target label and O the other one at the factor's layer:
      learned_s:   change(T) > floor(T)                       (training added information about T)
      contrast_s:  change(T) - change(O) > floor(T)           (... more than about O)
      specific_s:  trained(T) - trained(O) > floor(T)         (after training the gate is about T rather than O)
    With m = ceil(0.8 n) seeds: ``learned`` = learned_s and contrast_s in >= m seeds and the 95% t-interval of
    mean change(T) above 0; ``specific`` = specific_s in >= m seeds. Outcome: both -> 'reproduced'; one of them ->
    'partly reproduced'; neither -> 'not reproduced'.
    """
    layer, target, other = FACTORS[factor]
    n, m = len(runs), min_seeds(len(runs))
    d_target = [change(r, layer, target) for r in runs]
    d_other = [change(r, layer, other) for r in runs]
    floors = [floor(r, layer, target) for r in runs]
    gap = [mi(r, "trained", layer, target) - mi(r, "trained", layer, other) for r in runs]
    learned_s = [dt > f and dt - do > f for dt, do, f in zip(d_target, d_other, floors)]
    specific_s = [g > f for g, f in zip(gap, floors)]
    stats = paired(d_target)
    learned = sum(learned_s) >= m and stats["ci95"] is not None and stats["ci95"][0] > 0
    specific = sum(specific_s) >= m
    outcome = ("reproduced" if learned and specific else "partly reproduced" if learned or specific
               else "not reproduced")
    return {"outcome": outcome, "layer": layer, "target": target, "other": other, "seeds": n, "needed": m,
            "learned": learned, "learned_seeds": sum(learned_s), "specific": specific,
            "specific_seeds": sum(specific_s), "change_target": stats, "change_other": paired(d_other),
            "contrast_change": paired([a - b for a, b in zip(d_target, d_other)]),
            "trained_gap": paired(gap), "floor_max": max(floors)}


def controls(runs: Sequence[dict]) -> dict[str, Any]:
    """The positive controls of one variant (README.md): without them the comparison says nothing.

    trained: test accuracy >= MIN_ACCURACY in every seed; alive: in both layers of every trained run every
    expert is the top-1 choice of >= MIN_USAGE of the test examples; resolution: the shuffle std of every routed
    MI the rule reads (both layers, all labels, both states, all seeds) is <= MAX_FLOOR bits.
    """
    acc = [r["final_eval"]["accuracy"] for r in runs]
    usage = [min(min(g["top1_usage"]) for g in r["gating"]) for r in runs]
    sds = [g[f"mi_{y}_{FLOOR_KEY}"] for r in runs for key in ("gating", "gating_untrained") for g in r[key]
           for y in ("position", "class")]
    out = {"trained": min(acc) >= MIN_ACCURACY, "min_accuracy": min(acc),
           "alive": min(usage) >= MIN_USAGE, "min_top1_usage": min(usage),
           "resolution": max(sds) <= MAX_FLOOR, "max_null_std": max(sds)}
    out["pass"] = out["trained"] and out["alive"] and out["resolution"]
    return out


def combine(where: str, what: str) -> str:
    """The claim's outcome from its two halves."""
    if where == what:
        return where
    if "not testable here" in (where, what):
        return "not testable here"
    return "partly reproduced"


def verdicts(runs: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per variant: controls, the 'where' and 'what' outcomes and the claim's outcome (a failed control gives
    'not testable here' for both halves). ``PRIMARY``'s is the verdict; the others are reported beside it."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        ctl = controls(rs)
        row: dict[str, Any] = {"controls": ctl}
        for factor in FACTORS:
            row[factor] = factor_outcome(rs, factor)
            if not ctl["pass"]:
                row[factor]["outcome"] = "not testable here"
        row["claim"] = combine(row["where"]["outcome"], row["what"]["outcome"])
        row["primary"] = variant == PRIMARY
        out[variant] = row
    return out


def summarize(runs: list[dict]) -> dict:
    """Per variant: mean and std over seeds (ddof=1) of accuracy, wall-clock and every layer's MI, trained and
    untrained; per layer and label the paired change; and the verdicts (only for runs with a control)."""
    out: dict = {}
    controlled = [r for r in runs if "gating_untrained" in r]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {"seeds": [r["seed"] for r in rs]}
        row["accuracy"] = sweep.mean_std([r["final_eval"]["accuracy"] for r in rs])
        row["wall_clock_s"] = sweep.mean_std([r["wall_clock_s"] for r in rs])
        for state, key in (("", "gating"), ("untrained_", "gating_untrained")):
            if not all(key in r for r in rs):
                continue
            for layer in range(len(rs[0][key])):
                for name in rs[0][key][layer]:
                    if name.startswith("mi_") or name == "mean_gate_entropy":
                        row[f"{state}layer{layer + 1}_{name}"] = sweep.mean_std([r[key][layer][name] for r in rs])
        if all("gating_untrained" in r for r in rs):
            row["untrained_accuracy"] = sweep.mean_std([r["untrained_eval"]["accuracy"] for r in rs])
            row["change"] = {f"layer{l}_{y}": {**paired([change(r, l, y) for r in rs]),
                                               "floor_max": max(floor(r, l, y) for r in rs)}
                             for l in (1, 2) for y in LABELS}
        out[variant] = row
    if controlled:
        out["verdicts"] = verdicts(controlled)
    return out


def _ci(stats: dict) -> str:
    ci = stats["ci95"]
    return "—" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def table(summary: dict) -> str:
    """Markdown: (1) accuracy and trained MI per variant (the old table's shape); (2) untrained -> trained per
    layer and label with the paired change; (3) the verdicts."""
    pm = sweep.pm
    variants = {k: v for k, v in summary.items() if k != "verdicts"}
    names = ("quadrant", "position", "class")
    lines = [f"Trained models, shuffle-corrected routed MI I(routing; label) in bits (mean ± std over seeds; the dense "
             f"mixture's routed MI is its soft MI). Test accuracy of the untrained (step-0) models in brackets.", "",
             "| routing | seeds | test accuracy (untrained) | " + " | ".join(
        f"layer {l}: I(routing; {y})" for l in (1, 2) for y in names) + " | wall-clock per run (s) |",
             "|---|---|---|" + "---|" * 6 + "---|"]
    for name, r in variants.items():
        cells = [pm(r[f"layer{l}_mi_{y}_{MI_KEY}"]) for l in (1, 2) for y in names]
        untrained = f" ({pm(r['untrained_accuracy'])})" if "untrained_accuracy" in r else ""
        lines.append(f"| {name} | {','.join(map(str, r['seeds']))} | {pm(r['accuracy'])}{untrained} | "
                     + " | ".join(cells) + f" | {r['wall_clock_s']['mean']:.0f} |")
    if not any("change" in r for r in variants.values()):
        return "\n".join(lines)
    lines += ["", "Untrained (step 0, same seed) -> trained, shuffle-corrected routed MI in bits (the statistic of "
              "the rule); change = trained - untrained per seed: mean ± std, 95% t-interval, seeds up/down; floor = "
              f"the largest per-seed threshold max({MIN_EFFECT}, {FLOOR_SIGMAS:g} shuffle stds of a difference). "
              "Last column: the hard MI (top-1 expert), untrained -> trained, for comparison.", "",
              "| routing | layer | label | untrained | trained | change | 95% CI | up/down | floor | hard MI |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in variants.items():
        if "change" not in r:
            continue
        for l in (1, 2):
            for y in names:
                c = r["change"][f"layer{l}_{y}"]
                hard = f"mi_{y}_hard_corrected"
                lines.append(f"| {name} | {l} | {y} | {pm(r[f'untrained_layer{l}_mi_{y}_{MI_KEY}'])} | "
                             f"{pm(r[f'layer{l}_mi_{y}_{MI_KEY}'])} | {pm(c)} | {_ci(c)} | "
                             f"{c['up']}/{c['down']} | {c['floor_max']:.3f} | "
                             f"{r[f'untrained_layer{l}_{hard}']['mean']:.3f} -> {r[f'layer{l}_{hard}']['mean']:.3f} |")
    if "verdicts" in summary:
        lines += ["", "| routing | controls (min accuracy, min top-1 usage, max shuffle std) | where (layer 1) | "
                  "what (layer 2) | claim |", "|---|---|---|---|---|"]
        for name, v in summary["verdicts"].items():
            c = v["controls"]
            ctl = (f"{'pass' if c['pass'] else 'FAIL'} ({c['min_accuracy']:.3f}, {c['min_top1_usage']:.3f}, "
                   f"{c['max_null_std']:.3f})")
            halves = [f"{v[f]['outcome']} (learned {v[f]['learned_seeds']}/{v[f]['seeds']}, specific "
                      f"{v[f]['specific_seeds']}/{v[f]['seeds']})" for f in ("where", "what")]
            label = f"**{name}** (primary)" if v["primary"] else name
            lines.append(f"| {label} | {ctl} | {halves[0]} | {halves[1]} | {v['claim']} |")
    return "\n".join(lines)


def untrained_table(runs: list[dict]) -> str:
    """Markdown of the pilot: per variant and seed, each layer's untrained corrected routed MI (shuffle std) /
    soft MI / hard MI, bits."""
    names = ("quadrant", "position", "class")
    lines = ["Untrained (step 0) gating, shuffle-corrected MI in bits: routed (shuffle std) / soft / hard.", "",
             "| routing | seed | untrained accuracy | " + " | ".join(
                 f"layer {l}: I(gate; {y})" for l in (1, 2) for y in names) + " |", "|---|---|---|" + "---|" * 6]
    for r in runs:
        cells = [f"{mi(r, 'untrained', l, y):.3f} ({mi(r, 'untrained', l, y, FLOOR_KEY):.3f}) / "
                 f"{mi(r, 'untrained', l, y, 'soft_corrected'):.3f} / {mi(r, 'untrained', l, y, 'hard_corrected'):.3f}"
                 for l in (1, 2) for y in names]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['untrained_eval']['accuracy']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
