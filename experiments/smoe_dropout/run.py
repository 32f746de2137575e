"""The SMoE-Dropout sweep: variants x seeds -> results/<preset>/*.json, summary.json and the inference-k plot.

nice -n 10 python experiments/smoe_dropout/run.py --preset=full [--variants=smoe_dropout,dense] [--seeds=0,1,2]
                                                  [--threads=1]

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer, which also runs
SMoE-Dropout's k schedule) in its own workdir; then every MoE variant's final checkpoint is evaluated at each
inference k = 1..E with ``moejax.training.loop.evaluate_at_k`` on the same validation batches as the trainer's
own evaluation (the "self-slimmable" sweep). Dense variants have no k: their one evaluation is the trainer's.
A run whose JSON already exists is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import functools

from moejax import sweep


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return sweep.parser("smoe_dropout", __doc__.splitlines()[0]).parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "smoe_dropout", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)      # one XLA thread (--threads=1) and the dirty-tree refusal of --preset=full
    config_lib = load_sibling("config")
    sweep.refuse_dirty(args, config_lib.REFUSE_DIRTY)   # the registered overfit preset too
    import json

    import jax
    import jax.numpy as jnp

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts
    from moejax.training.loop import evaluate_at_k
    from moejax.training.metrics import to_python

    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        return summarize(sweep.load_runs(results, config_lib.VARIANTS), decide=args.preset in config_lib.FIT_PRESETS)
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        vocab = data_lib.from_config(config.data).meta.vocab_size
        model = build_model(config.model, vocab_size=vocab)
        counts = param_counts(model, jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32))
        by_k, fit = {}, None
        workdir = sweep.run_dir(args, variant, seed)
        if config.model.moe is not None:
            ks = config_lib.inference_ks(config.model.moe.num_experts)
            for k, m in evaluate_at_k(config, workdir, ks).items():
                by_k[str(k)] = {"loss": m["loss"], "accuracy": m["accuracy"], "step": m["step"],
                                "expert_load": [to_python(x) for x in m["expert_load"]]}
        if args.preset in config_lib.FIT_PRESETS:
            fit = train_fit(config, workdir)
        return {
            "final_eval": {k: to_python(v) for k, v in final.items()},
            **({"train_fit": fit} if fit is not None else {}),
            "params": {"total": counts.total, "active": counts.active},
            "eval_by_k": by_k,
        }

    def after(record: dict, workdir) -> None:
        curve = ", ".join(f"k={k}: {v['loss']:.4f}" for k, v in record["eval_by_k"].items())
        print(f"{record['variant']} seed {record['seed']}: val loss {record['final_eval']['loss']:.4f}"
              f"{'; ' + curve if curve else ''} ({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "smoe_dropout", config_lib, variants, seeds, results, command, measure, after)
    summary = summarize(runs, decide=args.preset in config_lib.FIT_PRESETS)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report_text(summary) + "\n")
    plot(summary, str(results / "loss_vs_k.png"))
    return summary


def train_fit(config, workdir) -> dict:
    """The final model scored on its own training bytes (the first ``train.eval_steps`` batches of
    ``data.train_split``), at the k of the trainer's evaluation (``train.eval_moe_k``; None: each router's k), with
    the same code as the validation loss: ``{"loss", "accuracy", "k"}``. Minus the validation loss, the
    generalisation gap."""
    from moejax.training.loop import evaluate_at_k

    fit_config = config.copy_and_resolve_references()
    fit_config.data.eval_split = config.data.train_split
    k = config.train.get("eval_moe_k")
    m = evaluate_at_k(fit_config, workdir, [k])[k]
    return {"loss": float(m["loss"]), "accuracy": float(m["accuracy"]), "k": k}


def monotone_steps(losses: list[float]) -> tuple[bool, float]:
    """(whether the loss never rises from one k to the next, the largest rise; 0 when monotone)."""
    rises = [b - a for a, b in zip(losses, losses[1:])]
    worst = max(rises, default=0.0)
    return worst <= 0.0, max(worst, 0.0)


def summarize(runs: list[dict], decide: bool = False) -> dict:
    """Per variant: mean and sample std (ddof=1) over seeds of the validation loss at every inference k (MoE
    variants) or of the trainer's evaluation (dense), how many seeds' curves are monotone in k, wall-clock, the
    loss on the training bytes where measured; plus, paired by seed, each variant's loss at its largest k minus
    ``dense``'s. ``decide``: also claim (b)'s registered rule (``report.claim_b``) under the key ``"claim_b"``."""
    out: dict = {}
    if decide:
        out["claim_b"] = load_sibling("report").claim_b(runs)
    dense = {r["seed"]: r["final_eval"]["loss"] for r in runs if r["variant"] == "dense"}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {"seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
               "val_loss": sweep.mean_std([r["final_eval"]["loss"] for r in rs]),
               "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs])}
        if all("train_fit" in r for r in rs):
            row["train_loss"] = sweep.mean_std([r["train_fit"]["loss"] for r in rs])
            row["gap"] = sweep.mean_std([r["final_eval"]["loss"] - r["train_fit"]["loss"] for r in rs])
        if rs[0]["eval_by_k"]:
            ks = list(rs[0]["eval_by_k"])
            row["loss_by_k"] = {k: sweep.mean_std([r["eval_by_k"][k]["loss"] for r in rs]) for k in ks}
            row["accuracy_by_k"] = {k: sweep.mean_std([r["eval_by_k"][k]["accuracy"] for r in rs]) for k in ks}
            checks = [monotone_steps([r["eval_by_k"][k]["loss"] for k in ks]) for r in rs]
            row["monotone_seeds"] = sum(ok for ok, _ in checks)
            row["largest_rise"] = max(rise for _, rise in checks)
            row["best_k"] = [min(ks, key=lambda k: r["eval_by_k"][k]["loss"]) for r in rs]
        full = [(r["seed"], r["eval_by_k"][list(r["eval_by_k"])[-1]]["loss"] if r["eval_by_k"]
                 else r["final_eval"]["loss"]) for r in rs]
        paired = [loss - dense[s] for s, loss in full if s in dense]
        if paired and variant != "dense":
            row["minus_dense_at_full_k"] = {"per_seed": paired, **sweep.mean_std(paired)}
        out[variant] = row
    return out


def variants_of(summary: dict) -> dict:
    """The per-variant rows of a :func:`summarize` result (without ``claim_b``)."""
    return {k: v for k, v in summary.items() if k != "claim_b"}


def fit_table(summary: dict) -> str:
    """Markdown rows of the variants scored on their training bytes: validation loss (full k), training loss and
    the generalisation gap, mean ± std over seeds ('' when no run was scored)."""
    rows = {n: r for n, r in variants_of(summary).items() if "train_loss" in r}
    if not rows:
        return ""
    pm = functools.partial(sweep.pm, digits=4)
    lines = ["| variant | validation loss (trainer's k) | training-bytes loss | gap |", "|---|---|---|---|"]
    lines += [f"| {n} | {pm(r['val_loss'])} | {pm(r['train_loss'])} | {pm(r['gap'])} |" for n, r in rows.items()]
    return "\n".join(lines)


def report_text(summary: dict) -> str:
    """Everything ``table.md`` holds: the main table, the k curves, the fit table and claim (b)'s verdict."""
    parts = [table(summary), curve_table(summary), fit_table(summary)]
    if "claim_b" in summary:
        parts.append(load_sibling("report").verdict_table(summary["claim_b"]))
    return "\n\n".join(p for p in parts if p)


def table_ks(summary: dict) -> list[str]:
    """The inference ks shown in the table: 1, 2, 4, ..., E (E included)."""
    ks = next((list(r["loss_by_k"]) for r in variants_of(summary).values() if "loss_by_k" in r), [])
    if not ks:
        return []
    top = int(ks[-1])
    shown = [k for k in ks if int(k) & (int(k) - 1) == 0]
    return shown if str(top) in shown else shown + [str(top)]


def table(summary: dict) -> str:
    """Markdown rows: variant, params, seeds, validation loss at inference k = 1, 2, 4, ..., E, the k of lowest
    loss in each seed, monotone seeds, largest rise of loss from one k to the next (over all k = 1..E), loss at
    full k minus dense (paired by seed), wall-clock."""
    pm = functools.partial(sweep.pm, digits=4)

    ks = table_ks(summary)
    lines = ["| variant | total params | seeds | " + " | ".join(f"k={k}" for k in ks)
             + " | best k (per seed) | monotone in k (seeds) | largest rise k→k+1 | full k minus dense (paired) "
               "| wall-clock per run (s) |",
             "|---|---|---|" + "---|" * len(ks) + "---|---|---|---|---|"]
    for name, r in variants_of(summary).items():
        if "loss_by_k" in r:
            cells = [pm(r["loss_by_k"][k]) for k in ks]
            best = ",".join(r["best_k"])
            mono = f"{r['monotone_seeds']}/{len(r['seeds'])}"
            rise = f"{r['largest_rise']:.4f}"
        else:  # dense: one number, the same at every k
            cells = [pm(r["val_loss"])] + ["″"] * (len(ks) - 1)
            best, mono, rise = "—", "—", "—"
        vs = pm(r["minus_dense_at_full_k"]) if "minus_dense_at_full_k" in r else "—"
        lines.append(f"| {name} | {r['params']['total']:,} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(cells) + f" | {best} | {mono} | {rise} | {vs} | {r['wall_clock_s']['mean']:.0f} |")
    return "\n".join(lines)


def curve_table(summary: dict) -> str:
    """Markdown rows of the MoE variants: validation loss (mean ± std over seeds) at every inference k = 1..E."""
    moe = {n: r for n, r in variants_of(summary).items() if "loss_by_k" in r}
    if not moe:
        return ""
    ks = list(next(iter(moe.values()))["loss_by_k"])
    lines = ["| variant | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, r in moe.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['loss_by_k'][k]['mean']:.4f} ± {r['loss_by_k'][k]['std']:.4f}"
                                                  for k in ks) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Validation loss vs inference k (log2 axis), mean ± std over seeds; dense variants as horizontal bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ks = next((list(r["loss_by_k"]) for r in variants_of(summary).values() if "loss_by_k" in r), ["1"])
    xs = [int(k) for k in ks]
    colors = plt.get_cmap("tab10").colors
    for i, (name, r) in enumerate(variants_of(summary).items()):
        color = colors[i % len(colors)]
        if "loss_by_k" in r:
            means = [r["loss_by_k"][k]["mean"] for k in ks]
            stds = [r["loss_by_k"][k]["std"] for k in ks]
            ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, color=color, label=name)
        else:
            m, s = r["val_loss"]["mean"], r["val_loss"]["std"]
            ax.axhline(m, ls="--", lw=1, color=color, label=f"{name} (no k)")
            ax.axhspan(m - s, m + s, color=color, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("experts per token at inference (k)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    print(report_text(main()))
