"""The DeepSeekMoE sweep: variants x seeds -> results/<preset>/*.json and summary.json (+ a plot).

nice -n 10 python experiments/deepseekmoe/run.py --preset=full [--variants=gshard,fine_shared] [--seeds=0,1,2]
                                                 [--threads=1]
nice -n 10 python experiments/deepseekmoe/run.py --preset=registered --threads=1   # the pre-registered rerun
python experiments/deepseekmoe/run.py --preset=registered --table                  # its tables and verdicts

``--preset=registered`` (and ``pilot``, which writes to ``pilot/``) runs in two stages (:func:`registered`):
(1) learning-rate selection: every (size, layout) of ``config.REGISTERED_LAYOUTS`` at each learning rate of
``config.LR_GRID[size]`` on the selection seeds, scored on the selection half of the validation files; a choice at an
edge of the grid runs the next factor-2 step beyond it (at most ``config.LR_EXTEND_MAX``) and chooses again
(``report.choose_lr``); (2) the comparison: every (size, layout) at its chosen learning rate on the comparison
seeds, evaluated on the other half. Then ``report.summarize`` applies the registered rules. ``--variants`` takes
``<size>-<layout>`` names there (default: all), ``--stage=select`` stops after stage 1. The presets of
``config.REFUSE_DIRTY`` (``registered``, ``full``, ``long``) refuse a tree with uncommitted changes.

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir;
then the final checkpoint is restored and the redundancy test (redundancy.py) is run on the same validation
batches: the validation loss with each token's top 1/8 and 2/8 of routed experts disabled, minus the loss
without masking. A run whose JSON already exists is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import sys

# This checkout's moejax, not whichever one an editable install points to (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

REGISTERED = ("pilot", "registered")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("deepseekmoe", __doc__.splitlines()[0], compile_cache=True)
    p.add_argument("--stage", choices=("select", "all"), default="all",
                   help="registered/pilot: 'select' stops after the learning-rate selection")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.preset not in REGISTERED and not any(a.startswith("--compile_cache") for a in given):
        args.compile_cache = ""   # full / long / tiny run as before (no persistent compilation cache)
    return args


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "deepseekmoe", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)      # one XLA thread (--threads=1), the dirty-tree refusal of --preset=full, compile cache
    config_lib = load_sibling("config")
    sweep.refuse_dirty(args, config_lib.REFUSE_DIRTY)   # the registered preset (and long) too, not only 'full'
    if args.preset in REGISTERED:
        return registered(args, argv, config_lib)
    import json

    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        return summarize(sweep.load_runs(results, config_lib.VARIANTS))
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        return trained_measures(config, state, final)[-1]

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


def registered(args: argparse.Namespace, argv: list[str] | None, config_lib) -> dict:
    """The pre-registered rerun (README "Decision rules"): learning-rate selection, then the comparison at each
    layout's chosen learning rate; ``summary.json`` and ``table.md`` with the verdicts in the results directory
    (``results/registered/``, or ``pilot/`` for the pilot), run JSONs in its ``select/`` and ``compare/``."""
    import json

    report = load_sibling("report")
    here = pathlib.Path(__file__).resolve().parent
    root = pathlib.Path(args.results or (here / "pilot" if args.preset == "pilot" else here / "results" / args.preset))
    select_dir, compare_dir = root / "select", root / "compare"
    pairs = [(size, layout) for size, layouts in config_lib.REGISTERED_LAYOUTS.items() for layout in layouts]
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [w for w in wanted if w not in {f"{s}-{l}" for s, l in pairs}]
        if unknown:
            raise SystemExit(f"--variants={unknown}: {args.preset} runs '<size>-<layout>' of "
                             f"{[f'{s}-{l}' for s, l in pairs]}")
        pairs = [(s, l) for s, l in pairs if f"{s}-{l}" in wanted]
    select_seeds = list(config_lib.SELECT_SEEDS[args.preset])
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(config_lib.SEEDS[args.preset])
    allowed = {size: config_lib.lr_grid(size) for size in config_lib.SIZES}
    order = [config_lib.variant_name(s, l, lr) for s, l in pairs for lr in allowed[s]]

    def load(directory):
        if not directory.exists():
            return []
        return [r for r in sweep.load_runs(directory, order) if r["variant"] in order]

    def finish() -> dict:
        summary = report.summarize(load(compare_dir), load(select_dir), allowed, select_seeds)
        text = report.selection_table(summary) + "\n\n" + report.table(summary) + "\n\n" + report.verdict_table(summary)
        if not args.table:
            (root / "summary.json").write_text(json.dumps(summary, indent=2))
            (root / "table.md").write_text(text + "\n")
        print(text)
        return summary

    if args.table:
        return finish()
    select_dir.mkdir(parents=True, exist_ok=True)
    compare_dir.mkdir(parents=True, exist_ok=True)
    command = sweep.command_line(__file__, argv)
    measure = registered_measure(config_lib)

    def after(record: dict, workdir) -> None:
        print(f"{record['variant']} seed {record['seed']}: loss select {record['val_loss']['select']:.4f}, compare "
              f"{record['val_loss']['compare']:.4f} ({record['wall_clock_s']:.0f} s)", flush=True)

    def run(variants, run_seeds, directory):
        sweep.run_all(args, "deepseekmoe", config_lib, variants, run_seeds, directory, command, measure, after)

    # Stage 1: the learning rate of every (size, layout), chosen on the selection seeds and the selection split.
    choices = {}
    for size, layout in pairs:
        lrs = list(config_lib.LR_GRID[size])
        while True:
            run([config_lib.variant_name(size, layout, lr) for lr in lrs], select_seeds, select_dir)
            mine = [r for r in load(select_dir) if r["size"] == size and r["layout"] == layout]
            choice = report.choose_lr(mine, allowed[size], select_seeds)
            if choice["next"] is None:
                break
            lrs = [choice["next"]]
        choices[(size, layout)] = choice
        print(f"{size} {layout}: learning rate {choice['lr']:g} (selection losses {choice['losses']}"
              f"{', at an edge of the grid' if choice['at_edge'] else ''})", flush=True)
    if args.stage == "select":
        return finish()
    # Stage 2: every (size, layout) at its chosen learning rate on the comparison seeds.
    for size, layout in pairs:
        run([config_lib.variant_name(size, layout, choices[(size, layout)]["lr"])], seeds, compare_dir)
    return finish()


def registered_measure(config_lib):
    """``measure`` of the registered runs: the record fields of :func:`measure_registered`, with the n-gram baselines
    computed once per evaluation setup."""
    cache: dict = {}

    def measure(config, state, final, variant, seed) -> dict:
        return measure_registered(config_lib, config, state, final, variant, cache)
    return measure


def measure_registered(config_lib, config, state, final, variant, cache) -> dict:
    """Size, layout, learning rate; the loss on both halves of the validation files (``val_loss``: ``compare`` is the
    trainer's own evaluation, ``select`` the same model on ``config.SELECT_SPLIT``); parameter counts; the
    redundancy test on the comparison batches; the n-gram baselines on them."""
    from moejax import data as data_lib

    size, layout, lr = config_lib.parse_variant(variant)
    pipeline, model, variables, n_eval, record = trained_measures(config, state, final)
    select = data_lib.from_config({**config.data.to_dict(), "eval_split": config_lib.SELECT_SPLIT})
    select_loss = sweep.lm_loss_fn(model)(variables, itertools.islice(select.eval, n_eval))
    key = (config.data.seq_len, n_eval, config.data.eval_batch_size, config.data.eval_split)
    if key not in cache:
        cache[key] = ngram_losses(pipeline.train.stream, itertools.islice(pipeline.eval, n_eval))
    return {
        "size": size, "layout": layout, "lr": lr,
        "val_loss": {"select": select_loss, "compare": float(final["loss"])},
        **record, "baselines": cache[key],
        "splits": {"select": config_lib.SELECT_SPLIT, "compare": config.data.eval_split, "eval_batches": n_eval},
    }


def trained_measures(config, state, final) -> tuple:
    """What every run records (both sweeps): ``(pipeline, model, variables, n_eval, record)`` with record =
    ``final_eval``, parameter counts and the redundancy test (losses with each token's top routed experts
    disabled, on the first ``train.eval_steps`` eval batches; empty for the dense model)."""
    import jax
    import jax.numpy as jnp

    from moejax import data as data_lib
    from moejax.models import build_model, param_counts
    from moejax.training.metrics import to_python

    redundancy = load_sibling("redundancy")
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
    record = {"final_eval": {k: to_python(v) for k, v in final.items()},
              "params": {"total": counts.total, "active": counts.active, "routed_experts": counts.routed_experts},
              "redundancy": masking}
    return pipeline, model, variables, n_eval, record


def ngram_losses(train_stream, batches) -> dict:
    """Cross-entropy (nats per target byte) of add-one-smoothed unigram and bigram byte models of ``train_stream``
    (uint8[N]) on the real targets of LM eval ``batches`` (``tokens`` int[B, L + 1], ``mask`` [B, L]): the
    baselines of the learning control (a model that learned nothing beyond byte frequencies scores the unigram)."""
    import numpy as np
    s = np.asarray(train_stream, np.int64)
    uni = np.bincount(s, minlength=256) + 1.0
    uni = np.log(uni / uni.sum())
    bi = np.bincount(s[:-1] * 256 + s[1:], minlength=256 * 256).reshape(256, 256) + 1.0
    bi = np.log(bi / bi.sum(1, keepdims=True))
    u_sum = b_sum = count = 0.0
    for batch in batches:
        tok, m = np.asarray(batch["tokens"], np.int64), np.asarray(batch["mask"], np.float64)
        prev, nxt = tok[:, :-1], tok[:, 1:]
        u_sum -= float((uni[nxt] * m).sum())
        b_sum -= float((bi[prev, nxt] * m).sum())
        count += float(m.sum())
    return {"unigram": u_sum / max(count, 1.0), "bigram": b_sum / max(count, 1.0)}


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
    result = main()
    if "verdicts" not in result:   # full / long / tiny (registered() prints its own tables)
        print(table(result))
