"""The top-p routing sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md; decision rules applied.

nice -n 15 python experiments/top_p_routing/run.py --preset=full --threads=1 [--variants=top2,top_p40] [--seeds=0,1]
python experiments/top_p_routing/run.py --preset=full --table          # tables and verdicts of the results on disk

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) on the generated mixture of
``mixture.py`` in its own workdir; then :func:`class_evaluation` runs the final model on the same
``SIZES[preset]['eval_windows']`` windows of whole validation documents for every run, with the ``routing``
collection mutable, and records per target byte its cross-entropy, its class and the number of experts each MoE
layer used at the position that predicts it. A run whose JSON exists is skipped.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence

# This checkout's moejax, not whichever one an editable install points to (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

# Every threshold of the decision rules (README.md, "Decision rules"), named once.
MIN_SEEDS = 4              # of 5: a direction must hold in at least this many seeds
TOP2_EXPERTS = 2.0         # the baseline's experts per token
BUDGET_RATIO = 0.9         # "less than 90% activated parameters": top-p's experts per token <= 0.9 * 2
LEARNED_FRACTION = 0.8     # a class is "learned" when its loss is at most this fraction of its chance entropy
MIN_LOSS_GAP = 0.1         # nats/byte: the hard class's loss must exceed the easy class's by this much
MIN_DYNAMIC = 0.05         # top-p is "dynamic" when at least this fraction of (token, layer) pairs is off the mode
LAYER_RANGE = 0.1          # experts per token: the smallest spread across layers that counts as a variation
HARD, EASY = "arith", "copy"   # the claim-2 pair: computed digits vs copied letters


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "top_p_routing", name)


# ----------------------------------------------------------------------------- measurement

def class_evaluation(model, variables: Mapping[str, Any], windows: Mapping[str, Any], classes: Sequence[str],
                     batch_size: int = 32) -> dict[str, Any]:
    """Loss, accuracy and experts per token, overall and per class, per MoE layer.

    Args:
      windows: ``{"tokens": int[N, L + 1], "mask": float[N, L], "classes": int8[N, L]}`` (``mixture.eval_windows``).
      classes: the class names, indexed by the values of ``windows["classes"]``.

    Returns ``{"overall": stats, "classes": {name: stats}, "layers": [path], "histogram": [[fraction of targets
    with 0..K experts] per layer], "loss_experts_corr": Pearson r between per-target loss and mean experts over
    layers}``, where ``stats = {"count", "loss", "accuracy", "experts_per_layer": [mean experts per target],
    "experts": mean over layers}``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax.generation.evaluate import routing_paths

    @jax.jit
    def forward(tokens):
        (logits, _), state = model.apply(variables, tokens[:, :-1], deterministic=True, mutable=["routing"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == tokens[:, 1:]).astype(jnp.float32)
        paths = routing_paths(state["routing"])
        used = {p: (v["expert_index"][0] >= 0).sum(-1) for p, v in paths.items()}     # int[B, L] per layer
        return ce, correct, used

    tokens = np.asarray(windows["tokens"])
    ce_all, correct_all, used_all = [], [], {}
    for start in range(0, len(tokens), batch_size):
        ce, correct, used = forward(jnp.asarray(tokens[start:start + batch_size]))
        ce_all.append(np.asarray(ce))
        correct_all.append(np.asarray(correct))
        for p, u in used.items():
            used_all.setdefault(p, []).append(np.asarray(u))
    layers = sorted(used_all, key=_layer_order)
    mask = np.asarray(windows["mask"]) > 0
    cls = np.asarray(windows["classes"])[mask]
    ce = np.concatenate(ce_all)[mask]
    correct = np.concatenate(correct_all)[mask]
    used = np.stack([np.concatenate(used_all[p])[mask] for p in layers], axis=0).astype(np.float64)   # [layers, n]

    def stats(sel: np.ndarray) -> dict[str, Any]:
        per_layer = [float(u[sel].mean()) if sel.any() else math.nan for u in used]
        return {"count": int(sel.sum()), "loss": float(ce[sel].mean()) if sel.any() else math.nan,
                "accuracy": float(correct[sel].mean()) if sel.any() else math.nan,
                "experts_per_layer": per_layer, "experts": float(np.mean(per_layer))}

    k_max = int(used.max()) if used.size else 0
    mean_used = used.mean(0)
    corr = float(np.corrcoef(ce, mean_used)[0, 1]) if mean_used.std() > 0 and ce.std() > 0 else None
    return {"overall": stats(np.ones_like(ce, bool)),
            "classes": {name: stats(cls == i) for i, name in enumerate(classes)},
            "layers": layers,
            "histogram": [np.bincount(u.astype(int), minlength=k_max + 1).astype(float).tolist() for u in used],
            "off_mode_fraction": [float(1.0 - np.bincount(u.astype(int)).max() / len(u)) for u in used],
            "loss_experts_corr": corr}


def _layer_order(path: str) -> tuple:
    """``.../block_10/...`` after ``.../block_9/...``."""
    import re
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("top_p_routing", __doc__.splitlines()[0], compile_cache=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)
    import json
    import time

    import jax
    import jax.numpy as jnp

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts
    from moejax.training.metrics import to_python

    config_lib = load_sibling("config")
    mixture = load_sibling("mixture")
    if args.preset == "pilot":
        args.results = args.results or str(REPO / "experiments" / "top_p_routing" / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        summary = summarize(sweep.load_runs(results, config_lib.VARIANTS))
        print(report(summary))
        return summary
    command = sweep.command_line(__file__, argv)
    size = config_lib.SIZES[args.preset]
    windows = mixture.eval_windows("validation", size["eval_windows"], size["seq"])

    def measure(config, state, final, variant, seed) -> dict:
        start = time.perf_counter()
        model = build_model(config.model, vocab_size=data_lib.VOCAB_SIZE)
        variables = {"params": state["params"], **state["moe_state"]}
        counts = param_counts(model, jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32))
        ev = class_evaluation(model, variables, windows, mixture.CLASSES)
        return {"final_eval": {k: to_python(v) for k, v in final.items()},
                "params": {"total": counts.total, "active": counts.active, "routed_experts": counts.routed_experts},
                "evaluation": ev, "eval_wall_clock_s": time.perf_counter() - start}

    def after(record: dict, workdir) -> None:
        ev = record["evaluation"]
        cells = "; ".join(f"{c} {v['loss']:.3f}/{v['experts']:.2f}" for c, v in ev["classes"].items())
        print(f"{record['variant']} seed {record['seed']}: loss {ev['overall']['loss']:.4f}, experts "
              f"{ev['overall']['experts']:.3f} per token; class loss/experts: {cells} "
              f"({record['wall_clock_s']:.0f} s)", flush=True)

    sweep.run_all(args, "top_p_routing", config_lib, variants, seeds, results, command, measure, after)
    runs = sweep.load_runs(results, config_lib.VARIANTS)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report(summary) + "\n")
    print(report(summary))
    return summary


# ----------------------------------------------------------------------------- summary and decision rules

def overall_loss(run: dict) -> float:
    return run["evaluation"]["overall"]["loss"]


def overall_experts(run: dict) -> float:
    return run["evaluation"]["overall"]["experts"]


def class_value(run: dict, cls: str, key: str = "loss") -> float:
    return run["evaluation"]["classes"][cls][key]


def _by_seed(runs: list[dict], variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["variant"] == variant}


def paired(runs: list[dict], a: str, b: str, fa: Callable[[dict], float], fb: Callable[[dict], float] | None = None
           ) -> dict[str, Any] | None:
    """``fa(run of a) - fb(run of b)`` per common seed (``fb = fa`` by default; ``a == b`` compares two quantities
    of the same run): per-seed values, mean, std, 95% t-interval and how many seeds are > 0 and < 0."""
    fb = fa if fb is None else fb
    ra, rb = _by_seed(runs, a), _by_seed(runs, b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = [fa(ra[s]) - fb(rb[s]) for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, "positive": sum(d > 0 for d in diffs),
            "negative": sum(d < 0 for d in diffs), **sweep.mean_std(diffs), "ci95": sweep.ci95(diffs)}


def _need(pair: Mapping[str, Any]) -> int:
    return min(MIN_SEEDS, len(pair["seeds"]))


def clearly_negative(pair: Mapping[str, Any] | None) -> bool:
    """< 0 in at least MIN_SEEDS seeds (all of them when fewer) and the 95% interval of the mean below 0."""
    return pair is not None and pair["negative"] >= _need(pair) and pair["ci95"] is not None and pair["ci95"][1] < 0


def clearly_positive(pair: Mapping[str, Any] | None) -> bool:
    return pair is not None and pair["positive"] >= _need(pair) and pair["ci95"] is not None and pair["ci95"][0] > 0


def learned_control(runs: list[dict], variant: str, classes: Sequence[str] = (HARD, EASY)) -> dict[str, Any]:
    """Each class in ``classes`` has a loss at most ``LEARNED_FRACTION`` of its chance entropy
    (``mixture.CHANCE``) in at least MIN_SEEDS seeds of ``variant``: the model learned it (the task is not at floor).
    """
    chance = load_sibling("mixture").CHANCE
    rs = [r for r in runs if r["variant"] == variant]
    out = {}
    for c in classes:
        ok = sum(class_value(r, c) <= LEARNED_FRACTION * chance[c] for r in rs)
        out[c] = {"seeds_learned": ok, "of": len(rs), "chance": chance[c],
                  "passes": bool(rs) and ok >= min(MIN_SEEDS, len(rs))}
    return {"passes": all(v["passes"] for v in out.values()), "classes": out}


def dynamic_control(runs: list[dict], variant: str) -> dict[str, Any]:
    """Top-p actually varies the number of experts: the mean over layers and seeds of the fraction of targets
    whose layer used a number of experts other than that layer's most common one is at least MIN_DYNAMIC."""
    import numpy as np
    rs = [r for r in runs if r["variant"] == variant]
    if not rs:
        return {"passes": False, "off_mode_fraction": None}
    off = float(np.mean([np.mean(r["evaluation"]["off_mode_fraction"]) for r in rs]))
    return {"passes": off >= MIN_DYNAMIC, "off_mode_fraction": off}


def budget_verdict(runs: list[dict], variant: str) -> dict[str, Any]:
    """Experts per token of ``variant`` at most ``BUDGET_RATIO * 2`` in at least MIN_SEEDS seeds and on average."""
    import numpy as np
    rs = [r for r in runs if r["variant"] == variant]
    if not rs:
        return {"cheaper": False, "why": "not run"}
    e = [overall_experts(r) for r in rs]
    limit = BUDGET_RATIO * TOP2_EXPERTS
    below = sum(x <= limit for x in e)
    cheaper = below >= min(MIN_SEEDS, len(e)) and float(np.mean(e)) <= limit
    return {"cheaper": cheaper, "experts": sweep.mean_std(e), "ratio_to_top2": float(np.mean(e)) / TOP2_EXPERTS,
            "seeds_within_budget": below, "why": f"{np.mean(e):.3f} experts per token "
            f"({np.mean(e) / TOP2_EXPERTS:.0%} of top-2), <= {limit:.2f} in {below}/{len(e)} seeds"}


def claim1_verdict(runs: list[dict], variant: str) -> dict[str, Any]:
    """Claim 1 ("average improvement of 0.7% with less than 90% activated parameters") for ``variant`` vs top2."""
    pair = paired(runs, variant, "top2", overall_loss)
    if pair is None:
        return {"verdict": "not run", "why": f"missing {variant} or top2"}
    control = learned_control(runs, "top2")
    budget = budget_verdict(runs, variant)
    better, worse = clearly_negative(pair), clearly_positive(pair)
    if not control["passes"]:
        verdict = "not testable here"
    elif better and budget["cheaper"]:
        verdict = "reproduced"
    elif better or (budget["cheaper"] and not worse):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    return {"verdict": verdict, "loss_minus_top2": pair, "better": better, "worse": worse, "budget": budget,
            "control_learned": control,
            "why": f"loss {variant} - top2 {pair['mean']:+.4f} nats/byte (lower in {pair['negative']}/"
                   f"{len(pair['seeds'])} seeds, 95% CI {_ci(pair)}); {budget['why']}"}


def claim2_verdict(runs: list[dict], variant: str) -> dict[str, Any]:
    """Claim 2 ("dispatches more experts to tasks requiring complex reasoning skills"): within ``variant``,
    experts per token on HARD targets minus on EASY targets, paired by seed (same run)."""
    experts = paired(runs, variant, variant, lambda r: class_value(r, HARD, "experts"),
                     lambda r: class_value(r, EASY, "experts"))
    if experts is None:
        return {"verdict": "not run", "why": f"missing {variant}"}
    gap = paired(runs, variant, variant, lambda r: class_value(r, HARD), lambda r: class_value(r, EASY))
    harder = gap["positive"] >= _need(gap) and gap["mean"] >= MIN_LOSS_GAP
    learned, dynamic = learned_control(runs, variant), dynamic_control(runs, variant)
    if not (harder and learned["passes"] and dynamic["passes"]):
        verdict = "not testable here"
    elif clearly_positive(experts):
        verdict = "reproduced"
    elif experts["positive"] >= _need(experts):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    secondary = {  # reported beside the verdict, not deciding
        f"experts_{HARD}_minus_text": paired(runs, variant, variant, lambda r: class_value(r, HARD, "experts"),
                                            lambda r: class_value(r, "text", "experts")),
        f"experts_random_minus_{EASY}": paired(runs, variant, variant, lambda r: class_value(r, "random", "experts"),
                                              lambda r: class_value(r, EASY, "experts")),
        "loss_experts_corr": sweep.mean_std([r["evaluation"]["loss_experts_corr"] or 0.0
                                             for r in runs if r["variant"] == variant]),
    }
    return {"verdict": verdict, "experts_hard_minus_easy": experts, "loss_hard_minus_easy": gap,
            "secondary": secondary,
            "control_harder": harder, "control_learned": learned, "control_dynamic": dynamic,
            "why": f"experts {HARD} - {EASY} {experts['mean']:+.4f} per token (more in {experts['positive']}/"
                   f"{len(experts['seeds'])} seeds, 95% CI {_ci(experts)}); loss {HARD} - {EASY} "
                   f"{gap['mean']:+.3f} nats/byte; off-mode fraction {dynamic['off_mode_fraction']}"}


def claim3_verdict(runs: list[dict], variant: str) -> dict[str, Any]:
    """Claim 3 ("a variation in the number of experts needed across different layers"): per seed the spread
    (max - min) of ``variant``'s mean experts per token across its MoE layers, and which layer has the most."""
    import collections
    rs = [r for r in runs if r["variant"] == variant]
    if not rs:
        return {"verdict": "not run", "why": f"missing {variant}"}
    per_layer = [r["evaluation"]["overall"]["experts_per_layer"] for r in rs]
    ranges = [max(v) - min(v) for v in per_layer]
    argmax = [int(max(range(len(v)), key=v.__getitem__)) for v in per_layer]
    top_layer, top_count = collections.Counter(argmax).most_common(1)[0]
    need = min(MIN_SEEDS, len(rs))
    wide = sum(x >= LAYER_RANGE for x in ranges)
    dynamic = dynamic_control(runs, variant)
    if not dynamic["passes"]:
        verdict = "not testable here"
    elif wide >= need and top_count >= need:
        verdict = "reproduced"
    elif wide >= need:
        verdict = "partly"
    else:
        verdict = "not reproduced"
    half = len(per_layer[0]) // 2
    early_minus_late = [float(sum(v[:half]) / half - sum(v[half:]) / (len(v) - half)) for v in per_layer]
    return {"verdict": verdict, "range": sweep.mean_std(ranges), "per_seed_range": ranges, "argmax_layer": argmax,
            "control_dynamic": dynamic,
            # Reported beside the rule, not deciding (added after the pilot): first half of the MoE layers minus the
            # second half, experts per token, per seed.
            "early_minus_late": {"per_seed": early_minus_late, **sweep.mean_std(early_minus_late),
                                 "ci95": sweep.ci95(early_minus_late) if len(early_minus_late) > 1 else None,
                                 "positive_seeds": sum(x > 0 for x in early_minus_late)},
            "why": f"spread across layers {sweep.pm(sweep.mean_std(ranges), 3)} experts (>= {LAYER_RANGE} in "
                   f"{wide}/{len(rs)} seeds); most experts in layer {top_layer} in {top_count}/{len(rs)} seeds"}


def _ci(pair: Mapping[str, Any]) -> str:
    return "—" if pair["ci95"] is None else f"[{pair['ci95'][0]:+.4f}, {pair['ci95'][1]:+.4f}]"


def summarize(runs: list[dict]) -> dict:
    """Per variant: loss, experts per token, per class and per layer (mean ± std over seeds); the paired
    comparisons and the verdicts of the pre-registered rules for every top-p variant (PRIMARY decides)."""
    out: dict[str, Any] = {"variants": {}, "verdicts": {}}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        ev0 = rs[0]["evaluation"]
        n_layers = len(ev0["layers"])
        out["variants"][variant] = {
            "seeds": [r["seed"] for r in rs], "params": rs[0].get("params"),
            "loss": sweep.mean_std([overall_loss(r) for r in rs]),
            "experts": sweep.mean_std([overall_experts(r) for r in rs]),
            "experts_per_layer": [sweep.mean_std([r["evaluation"]["overall"]["experts_per_layer"][i] for r in rs])
                                  for i in range(n_layers)],
            "classes": {c: {**{key: sweep.mean_std([class_value(r, c, key) for r in rs])
                               for key in ("loss", "accuracy", "experts")},
                            "experts_per_layer": [sweep.mean_std([class_value(r, c, "experts_per_layer")[i]
                                                                  for r in rs]) for i in range(n_layers)]}
                        for c in ev0["classes"]},
            "off_mode_fraction": sweep.mean_std([sum(r["evaluation"]["off_mode_fraction"]) / n_layers for r in rs]),
            "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs]),
        }
    for variant in out["variants"]:
        if variant == "top2":
            continue
        out["verdicts"][variant] = {"claim1_quality_at_lower_compute": claim1_verdict(runs, variant),
                                    "claim2_more_experts_for_harder": claim2_verdict(runs, variant),
                                    "claim3_layer_variation": claim3_verdict(runs, variant)}
    return out


PAPER = {  # the paper's own numbers (README, "The paper's numbers"): abstract and the authors' README figures
    "loss": "+0.7 points avg accuracy over Top-2 (41.6 -> 42.3)",
    "experts": "top-2: 2; dynamic: 1.76 avg (1.72-1.87 per task)",
    "arith_vs_copy": "BBH 1.87 vs 1.72-1.76 on the other four tasks",
    "layers": "> 0 (abstract: 'a variation'); values not read",
}


def table(summary: dict) -> str:
    """Markdown: one row per variant: loss, experts per token overall and per class, the paper's column."""
    classes = next(iter(summary["variants"].values()))["classes"] if summary["variants"] else {}
    rows = ["| variant | seeds | loss (nats/byte) | experts/token | "
            + " | ".join(f"{c}: loss / experts" for c in classes) + " | experts per layer |",
            "|---|---|---|---|" + "---|" * len(classes) + "---|"]
    for name, v in summary["variants"].items():
        rows.append(f"| {name} | {','.join(map(str, v['seeds']))} | {sweep.pm(v['loss'], 4)} | "
                    f"{sweep.pm(v['experts'], 3)} | "
                    + " | ".join(f"{sweep.pm(c['loss'], 3)} / {c['experts']['mean']:.3f}" for c in v["classes"].values())
                    + " | " + ", ".join(f"{x['mean']:.2f}" for x in v["experts_per_layer"]) + " |")
    return "\n".join(rows)


def verdict_table(summary: dict) -> str:
    rows = ["| variant | claim | verdict | ours | paper |", "|---|---|---|---|---|"]
    paper = {"claim1_quality_at_lower_compute": PAPER["loss"] + "; " + PAPER["experts"],
             "claim2_more_experts_for_harder": PAPER["arith_vs_copy"], "claim3_layer_variation": PAPER["layers"]}
    for variant, claims in summary["verdicts"].items():
        for claim, v in claims.items():
            rows.append(f"| {variant} | {claim} | **{v['verdict']}** | {v.get('why', '')} | {paper[claim]} |")
    return "\n".join(rows)


def layer_table(summary: dict) -> str:
    """Markdown: experts per token of every top-p variant per class and MoE layer (mean over seeds)."""
    rows = ["| variant | class | experts per token, by MoE layer | off-mode fraction (all classes) |",
            "|---|---|---|---|"]
    for name, v in summary["variants"].items():
        if name == "top2":
            continue
        for c, cv in v["classes"].items():
            rows.append(f"| {name} | {c} | " + ", ".join(f"{x['mean']:.2f}" for x in cv["experts_per_layer"])
                        + f" | {v['off_mode_fraction']['mean']:.3f} |")
    return "\n".join(rows)


def secondary_lines(summary: dict) -> list[str]:
    lines = []
    for variant, claims in summary["verdicts"].items():
        sec = claims["claim2_more_experts_for_harder"].get("secondary", {})
        cells = [f"{k} {p['mean']:+.3f} (95% CI {_ci(p)})" for k, p in sec.items()
                 if isinstance(p, dict) and "per_seed" in p]
        if "loss_experts_corr" in sec:
            cells.append(f"per-token corr(loss, experts) {sweep.pm(sec['loss_experts_corr'], 3)}")
        eml = claims["claim3_layer_variation"].get("early_minus_late")
        if eml:
            cells.append(f"claim 3: first half minus second half of the MoE layers {eml['mean']:+.3f} experts "
                         f"(95% CI {'[%+.3f, %+.3f]' % tuple(eml['ci95']) if eml['ci95'] else 'n/a'}, > 0 in {eml['positive_seeds']}/{len(eml['per_seed'])} seeds)")
        lines.append(f"- {variant}, not deciding: " + "; ".join(cells))
    return lines


def report(summary: dict) -> str:
    return "\n".join([table(summary), "", layer_table(summary), "", verdict_table(summary), "",
                      *secondary_lines(summary)])


if __name__ == "__main__":
    main()
