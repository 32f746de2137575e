"""The deep-MoE sweep: variants x seeds -> results/<preset>/*.json, results/<preset>/summary.json, plots.

nice -n 10 python experiments/deep_moe/run.py --preset=full [--variants=dense,top1] [--seeds=0,1,2] [--threads=1]

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir,
restores the final checkpoint and measures the gating of both MoE layers on the test split (analysis.py).
A run whose JSON already exists is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse

from moejax import sweep


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return sweep.parser("deep_moe", __doc__.splitlines()[0]).parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "deep_moe", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads == 1:  # must happen before jax initialises its CPU client
        sweep.pin_one_thread()
    import json

    import jax
    import numpy as np

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts

    analysis = load_sibling("analysis")
    config_lib = load_sibling("config")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        return summarize(sweep.load_runs(results, config_lib.VARIANTS))
    command = sweep.command_line(__file__, argv)
    cache: dict = {}

    def measure(config, state, final, variant, seed) -> dict:
        if "test" not in cache:
            cache["test"] = data_lib.materialize(data_lib.load_split(config.data.name, "test", config.data.data_dir),
                                                 ("image", "label", "position", "position_class")).columns
        test = cache["test"]
        model = build_model(config.model, num_classes=10, input_shape=test["image"].shape[1:])
        variables = {"params": state["params"], **state["moe_state"]}
        gates = cache["gates"] = analysis.gate_distributions(model, variables, test["image"])
        counts = param_counts(model, jax.ShapeDtypeStruct((1, *test["image"].shape[1:]), np.float32))
        return {
            "final_eval": {k: v for k, v in final.items() if k != "expert_load"},
            "gating": analysis.gating_summary(gates, {
                "quadrant": (test["position_class"], 4), "position": analysis.position_ids(test["position"]),
                "class": (test["label"], 10)}),
            "params": {"total": counts.total, "active": counts.active},
        }

    def after(record: dict, workdir) -> None:
        test, gates, variant, seed = cache["test"], cache["gates"], record["variant"], record["seed"]
        accuracy = record["final_eval"]["accuracy"]
        if seed == seeds[0]:
            analysis.plot_gating(gates, test["position"], test["label"], str(results / f"gating_{variant}.png"),
                                 f"deep MoE, {variant}, seed {seed}, test accuracy {accuracy:.3f}")
        np.savez_compressed(workdir / "test_gates.npz", *gates)  # to re-analyse without retraining
        print(f"{variant} seed {seed}: accuracy {accuracy:.4f}, " + "; ".join(
            f"layer {i + 1} MI quadrant {g['mi_quadrant_soft_corrected']:.3f} position "
            f"{g['mi_position_soft_corrected']:.3f} class {g['mi_class_soft_corrected']:.3f}"
            for i, g in enumerate(record["gating"])) + f" ({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "deep_moe", config_lib, variants, seeds, results, command, measure, after)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(table(summary) + "\n")
    return summary


def summarize(runs: list[dict]) -> dict:
    """Mean and std (sample std, ddof=1, over seeds) per variant of accuracy, wall-clock and each layer's MI."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {"seeds": [r["seed"] for r in rs]}
        row["accuracy"] = sweep.mean_std([r["final_eval"]["accuracy"] for r in rs])
        row["wall_clock_s"] = sweep.mean_std([r["wall_clock_s"] for r in rs])
        for layer in range(len(rs[0]["gating"])):
            for key in rs[0]["gating"][layer]:
                if key.startswith("mi_") or key == "mean_gate_entropy":
                    row[f"layer{layer + 1}_{key}"] = sweep.mean_std([r["gating"][layer][key] for r in rs])
        out[variant] = row
    return out


def table(summary: dict) -> str:
    """Markdown rows: variant, seeds, test accuracy, per layer the shuffle-corrected soft MI with quadrant,
    exact position and class (mean ± std over seeds)."""
    pm = sweep.pm

    names = ("quadrant", "position", "class")
    lines = ["| routing | seeds | test accuracy | " + " | ".join(f"layer {l}: I(gate; {y})" for l in (1, 2)
                                                                 for y in names) + " | wall-clock per run (s) |",
             "|---|---|---|" + "---|" * 6 + "---|"]
    for name, r in summary.items():
        cells = [pm(r[f"layer{l}_mi_{y}_soft_corrected"]) for l in (1, 2) for y in names]
        lines.append(f"| {name} | {','.join(map(str, r['seeds']))} | {pm(r['accuracy'])} | " + " | ".join(cells)
                     + f" | {r['wall_clock_s']['mean']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(main()))
