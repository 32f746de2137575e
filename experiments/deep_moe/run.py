"""The deep-MoE sweep: variants x seeds -> results/<preset>/*.json, results/<preset>/summary.json, plots.

nice -n 10 python experiments/deep_moe/run.py --preset=full [--variants=dense,top1] [--seeds=0,1,2] [--threads=1]

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir,
restores the final checkpoint and measures the gating of both MoE layers on the test split (analysis.py).
A run whose JSON already exists is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="full")
    p.add_argument("--variants", default=None, help="comma-separated; default: all of config.VARIANTS")
    p.add_argument("--seeds", default=None, help="comma-separated; default: config.SEEDS[preset]")
    p.add_argument("--workdir", default="/tmp/moejax_experiments/deep_moe")
    p.add_argument("--results", default=None, help="default: experiments/deep_moe/results/<preset>")
    p.add_argument("--threads", type=int, default=None, help="pin XLA:CPU to one thread when 1 (set before jax)")
    p.add_argument("--table", action="store_true", help="only print the markdown table of the existing results")
    return p.parse_args(argv)


def load_sibling(name: str):
    """This directory's ``<name>.py`` as module ``deep_moe_<name>`` (both experiment dirs have a ``config.py``)."""
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    full = f"deep_moe_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, os.path.join(here, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def code_version() -> dict:
    """Which moejax ran: its path, the git commit of its checkout (if any), or $MOEJAX_CODE_VERSION."""
    import subprocess

    import moejax
    root = os.path.dirname(os.path.dirname(os.path.abspath(moejax.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"moejax_path": root, "git_commit": commit, "note": os.environ.get("MOEJAX_CODE_VERSION")}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads == 1:  # must happen before jax initialises its CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    here = os.path.dirname(os.path.abspath(__file__))
    import json
    import pathlib
    import shutil
    import time

    import jax
    import numpy as np

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.loop import to_jsonable, train_and_evaluate

    analysis = load_sibling("analysis")
    config_lib = load_sibling("config")

    variants = args.variants.split(",") if args.variants else list(config_lib.VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(config_lib.SEEDS[args.preset])
    results = pathlib.Path(args.results or os.path.join(here, "results", args.preset))
    results.mkdir(parents=True, exist_ok=True)
    machine = {"platform": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
               "uname": " ".join(os.uname()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    command = " ".join([os.path.relpath(sys.argv[0]) if argv is None else "run.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)])
    test = None
    if args.table:
        import json
        runs = [json.loads(f.read_text()) for f in sorted(results.glob("*_seed*.json"))]
        order = {v: i for i, v in enumerate(config_lib.VARIANTS)}
        runs.sort(key=lambda r: (order.get(r["variant"], 99), r["seed"]))
        return summarize(runs)
    code = code_version()
    runs = []
    for variant in variants:
        for seed in seeds:
            out = results / f"{variant}_seed{seed}.json"
            if out.exists():
                runs.append(json.loads(out.read_text()))
                continue
            config = config_lib.get_config(f"{args.preset},{variant}")
            config.seed = seed
            config.data.seed = seed
            workdir = pathlib.Path(args.workdir) / args.preset / f"{variant}_seed{seed}"
            shutil.rmtree(workdir, ignore_errors=True)
            start = time.perf_counter()
            final = train_and_evaluate(config, workdir)
            train_s = time.perf_counter() - start
            ckpt = Checkpointer(workdir, keep=1, async_save=False)
            state = ckpt.restore_raw()
            ckpt.close()
            if test is None:
                test = data_lib.materialize(data_lib.load_split(config.data.name, "test", config.data.data_dir),
                                            ("image", "label", "position", "position_class")).columns
            model = build_model(config.model, num_classes=10, input_shape=test["image"].shape[1:])
            variables = {"params": state["params"], **state["moe_state"]}
            gates = analysis.gate_distributions(model, variables, test["image"])
            counts = param_counts(model, jax.ShapeDtypeStruct((1, *test["image"].shape[1:]), np.float32))
            record = {
                "experiment": "deep_moe", "preset": args.preset, "variant": variant, "seed": seed,
                "final_eval": {k: v for k, v in final.items() if k != "expert_load"},
                "gating": analysis.gating_summary(gates, {
                    "quadrant": (test["position_class"], 4), "position": analysis.position_ids(test["position"]),
                    "class": (test["label"], 10)}),
                "params": {"total": counts.total, "active": counts.active},
                "wall_clock_s": time.perf_counter() - start, "train_wall_clock_s": train_s,
                "jax_version": jax.__version__, "machine": machine, "code": code, "command": command,
                "config": to_jsonable(config),
            }
            if seed == seeds[0]:
                analysis.plot_gating(gates, test["position"], test["label"], str(results / f"gating_{variant}.png"),
                                     f"deep MoE, {variant}, seed {seed}, test accuracy {final['accuracy']:.3f}")
            out.write_text(json.dumps(record, indent=2))
            np.savez_compressed(workdir / "test_gates.npz", *gates)  # to re-analyse without retraining
            print(f"{variant} seed {seed}: accuracy {final['accuracy']:.4f}, " + "; ".join(
                f"layer {i + 1} MI quadrant {g['mi_quadrant_soft_corrected']:.3f} position "
                f"{g['mi_position_soft_corrected']:.3f} class {g['mi_class_soft_corrected']:.3f}"
                for i, g in enumerate(record["gating"])) + f" ({record['wall_clock_s']:.0f} s)", flush=True)
            runs.append(record)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(table(summary) + "\n")
    return summary


def summarize(runs: list[dict]) -> dict:
    """Mean and std (sample std, ddof=1, over seeds) per variant of accuracy, wall-clock and each layer's MI."""
    import numpy as np
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {"seeds": [r["seed"] for r in rs]}

        def stat(values):
            v = np.asarray(values, float)
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

        row["accuracy"] = stat([r["final_eval"]["accuracy"] for r in rs])
        row["wall_clock_s"] = stat([r["wall_clock_s"] for r in rs])
        for layer in range(len(rs[0]["gating"])):
            for key in rs[0]["gating"][layer]:
                if key.startswith("mi_") or key == "mean_gate_entropy":
                    row[f"layer{layer + 1}_{key}"] = stat([r["gating"][layer][key] for r in rs])
        out[variant] = row
    return out


def table(summary: dict) -> str:
    """Markdown rows: variant, seeds, test accuracy, per layer the shuffle-corrected soft MI with quadrant,
    exact position and class (mean ± std over seeds)."""
    def pm(s, digits=3):
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

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
