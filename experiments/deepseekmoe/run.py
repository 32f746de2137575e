"""The DeepSeekMoE sweep: variants x seeds -> results/<preset>/*.json and summary.json (+ a plot).

nice -n 10 python experiments/deepseekmoe/run.py --preset=full [--variants=gshard,fine_shared] [--seeds=0,1,2]
                                                 [--threads=1]

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir;
then the final checkpoint is restored and the redundancy test (redundancy.py) is run on the same validation
batches: the validation loss with each token's top 1/8 and 2/8 of routed experts disabled, minus the loss
without masking. A run whose JSON already exists is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import functools

from moejax import sweep


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return sweep.parser("deepseekmoe", __doc__.splitlines()[0]).parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "deepseekmoe", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)      # one XLA thread (--threads=1) and the dirty-tree refusal of --preset=full
    import json

    import jax
    import jax.numpy as jnp

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts
    from moejax.training.metrics import to_python

    config_lib = load_sibling("config")
    redundancy = load_sibling("redundancy")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        return summarize(sweep.load_runs(results, config_lib.VARIANTS))
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        pipeline = data_lib.from_config(config.data)
        model = build_model(config.model, vocab_size=pipeline.meta.vocab_size)
        variables = {"params": state["params"], **state["moe_state"]}
        counts = param_counts(model, jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32))
        n_eval = int(config.train.eval_steps)
        masking = {}
        if config.model.moe is not None:
            base, *masked = redundancy.eval_losses(config.model, pipeline.meta.vocab_size, variables, pipeline.eval,
                                                   n_eval, (0.0, *redundancy.RATIOS))
            for ratio, loss in zip(redundancy.RATIOS, masked):
                masking[f"{ratio:.3f}"] = {"loss": loss, "increase": loss - base}
            masking["unmasked_loss"] = base
        return {
            "final_eval": {k: to_python(v) for k, v in final.items()},
            "params": {"total": counts.total, "active": counts.active, "routed_experts": counts.routed_experts},
            "redundancy": masking,
        }

    def after(record: dict, workdir) -> None:
        masking = record["redundancy"]
        extra = "" if not masking else "; loss increase " + ", ".join(
            f"{k}: {v['increase']:+.4f}" for k, v in masking.items() if k != "unmasked_loss")
        print(f"{record['variant']} seed {record['seed']}: val loss {record['final_eval']['loss']:.4f}{extra} "
              f"({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "deepseekmoe", config_lib, variants, seeds, results, command, measure, after)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(table(summary) + "\n")
    plot(summary, str(results / "val_loss.png"))
    return summary


def summarize(runs: list[dict]) -> dict:
    """Per variant: mean and sample std (ddof=1) over seeds of the validation loss, loss increases, wall-clock."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {"seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
               "val_loss": sweep.mean_std([r["final_eval"]["loss"] for r in rs]),
               "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs])}
        for key in rs[0]["redundancy"]:
            if key != "unmasked_loss":
                row[f"increase_{key}"] = sweep.mean_std([r["redundancy"][key]["increase"] for r in rs])
        out[variant] = row
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, [summary[n]["val_loss"]["mean"] for n in names],
           yerr=[summary[n]["val_loss"]["std"] for n in names], capsize=4)
    lo = min(summary[n]["val_loss"]["mean"] for n in names)
    hi = max(summary[n]["val_loss"]["mean"] for n in names)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3) - 0.02, hi + 0.1 * (hi - lo + 1e-3) + 0.02)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """Markdown rows: variant, params, seeds, validation loss, redundancy loss increases, wall-clock."""
    pm = functools.partial(sweep.pm, digits=4)

    lines = ["| variant | total params | active params | seeds | validation loss (nats/byte) "
             "| loss increase, top 1/8 routed disabled | top 2/8 disabled | wall-clock per run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        inc = [pm(r[k]) if k in r else "—" for k in ("increase_0.125", "increase_0.250")]
        lines.append(f"| {name} | {r['params']['total']:,} | {r['params']['active']:,} | "
                     f"{','.join(map(str, r['seeds']))} | {pm(r['val_loss'])} | {inc[0]} | {inc[1]} | "
                     f"{r['wall_clock_s']['mean']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(main()))
