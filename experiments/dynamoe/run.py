"""The DynaMoE sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md, plots and verdicts.

nice -n 15 python experiments/dynamoe/run.py --preset=registered --threads=1 [--variants=...] [--seeds=0,1]
python experiments/dynamoe/run.py --preset=registered --table     # tables and verdicts of the JSONs on disk

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer), which saves a
checkpoint every 1/8 of training. Then, at each step of ``config.measure_steps`` (1/8, 1/4, 1/2 and all of
training), the checkpoint is restored and the gradient of the trainer's own objective (``make_train_step``'s
loss, through :mod:`moejax.training.gradients`) is taken on ``GRAD_BATCHES`` minibatches at those fixed
parameters: the ``GRAD_BATCHES`` training batches that follow the step in the run's own data order (distinct
examples unless they straddle an epoch boundary). The record holds their noise statistics per parameter group
(router, experts, other, all; see :func:`moejax.training.gradients.gradient_noise`) and the mean experts per
token of each layer on those batches, plus the experts/token the trainer logged during training, and
(:func:`routing_on_test_set`) the number of experts each test example used in each layer, with the final parameters
and the trainer's own eval batches (``EVAL_BATCH``, which divide the test split). A persistent
compilation cache (``--compile_cache``) lets the seeds of a variant compile once. A run whose JSON exists
is skipped, so a killed sweep continues where it stopped. ``--preset=pilot`` writes to ``pilot/``; the presets
of ``config.REFUSE_DIRTY`` (``registered``, and the superseded ``full``) refuse a tree with uncommitted changes.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

# This checkout's moejax, not whichever one an editable install points to (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

GRAD_BATCHES = 16


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("dynamoe", __doc__.splitlines()[0], compile_cache=True)
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "dynamoe", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)      # one XLA thread (before jax starts), the dirty-tree refusal of 'full', the compile cache
    import json

    config_lib = load_sibling("config")
    sweep.refuse_dirty(args, config_lib.REFUSE_DIRTY)   # the registered preset too, not only 'full'

    report = load_sibling("report")
    if args.preset == "paper" and not args.variants:
        args.variants = ",".join(config_lib.PAPER_VARIANTS)
    if args.preset in ("pilot", "registered") and not args.variants:
        args.variants = ",".join(config_lib.REGISTERED_VARIANTS)
    if args.preset == "pilot":
        args.results = args.results or str(pathlib.Path(__file__).resolve().parent / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    first, then = ((config_lib.REGISTERED_VARIANTS, config_lib.VARIANTS) if args.preset in ("pilot", "registered")
                   else (config_lib.VARIANTS, config_lib.REGISTERED_VARIANTS))
    order = tuple(dict.fromkeys(first + then + config_lib.PAPER_VARIANTS))   # table order, each variant once
    if args.table:
        summary = report.summarize(sweep.load_runs(results, order))
        print(report.table(summary))
        print(report.verdict_table(summary))
        return summary
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        workdir = sweep.run_dir(args, variant, seed)
        return measure_run(config_lib, config, workdir, final, state)

    def after(record: dict, workdir) -> None:
        last = record["grad_noise"][-1]
        print(f"{record['variant']} seed {record['seed']}: accuracy {record['final_eval']['accuracy']:.4f}, "
              f"experts/token {[round(x, 2) for x in record['experts_per_token_train']['mean']]}, "
              f"test experts/token {[round(x, 2) for x in record['test_routing']['experts_per_token']]}, "
              f"final noise all {last['groups']['all']['noise']:.3g} router {last['groups']['router']['noise']:.3g} "
              f"({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "dynamoe", config_lib, variants, seeds, results, command, measure, after)
    runs = sweep.load_runs(results, order)  # every run of this preset on disk, not only this invocation's
    summary = report.summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report.table(summary) + "\n" + report.verdict_table(summary) + "\n")
    report.plot_accuracy(summary, str(results / "accuracy.png"))
    report.plot_noise(summary, str(results / "grad_noise.png"))
    print(report.table(summary))
    print(report.verdict_table(summary))
    return summary


def routing_on_test_set(model, state, eval_data, task: str) -> dict:
    """Experts used per test example and MoE layer, with the final parameters (deterministic routing).

    The batches are the trainer's eval batches (``data.eval_batch_size``); percentile routing is batch-dependent,
    so they must hold no padding rows (``EVAL_BATCH`` divides every test split; checked). Returns
    ``{"experts_per_token": [mean per layer], "histogram": [[examples using 0..k experts] per layer],
    "off_mode_fraction": [fraction of examples whose count differs from the layer's most common count],
    "accuracy": test accuracy of the same forward passes (a check against the trainer's), "examples": n}``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax.generation.evaluate import routing_paths
    from moejax.training.steps import split_batch

    params, moe_state = ((state.params, state.moe_state) if hasattr(state, "params")
                         else (state["params"], state.get("moe_state")))
    variables = {"params": params, **(moe_state or {})}
    collections = [k for k in variables if k not in ("params", "routing")] + ["routing"]

    @jax.jit
    def forward(batch):
        inputs, labels = split_batch(batch, task)
        (logits, _), new = model.apply(variables, inputs, deterministic=True, mutable=collections)
        paths = routing_paths(new["routing"])
        used = [(paths[p]["expert_index"][0] >= 0).sum(-1).reshape(-1)                          # int[B] per layer
                for p in sorted(paths, key=_natural)]
        return (jnp.argmax(logits, -1) == labels).sum(), used

    correct, used, n = 0, None, 0
    for batch in eval_data:
        if not np.all(batch["mask"] > 0):
            raise ValueError("routing_on_test_set: an eval batch holds padding rows; EVAL_BATCH must divide the "
                             "test split")
        c, u = forward({k: jnp.asarray(v) for k, v in batch.items()})
        correct += int(c)
        n += len(batch["mask"])
        u = [np.asarray(x) for x in u]
        used = u if used is None else [np.concatenate([a, b]) for a, b in zip(used, u)]
    return {**routing_summary(used), "accuracy": correct / n, "examples": n}


def routing_summary(used) -> dict:
    """``used``: one int[n] per MoE layer, the number of experts each of n examples used -> ``{"experts_per_token":
    [mean per layer], "histogram": [[examples using 0, 1, ..., max experts] per layer], "off_mode_fraction":
    [1 - (examples at the layer's most common count) / n, per layer]}``."""
    import numpy as np
    used = [np.asarray(u, np.int64) for u in used]
    hist = [np.bincount(u, minlength=int(u.max()) + 1) for u in used]
    return {"experts_per_token": [float(u.mean()) for u in used],
            "histogram": [h.astype(int).tolist() for h in hist],
            "off_mode_fraction": [float(1.0 - h.max() / h.sum()) for h in hist]}


def _natural(path: str) -> tuple:
    """``.../moe_10`` after ``.../moe_9``: MoE layers in depth order."""
    import re
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def measure_run(config_lib, config, workdir, final: dict, state: dict) -> dict:
    """Gradient noise at each measurement step, experts/token (logged, on the gradient batches and per test
    example), parameter counts; ``state``: the final checkpoint (``params``, ``moe_state``), as ``run_all`` reads it."""
    import json

    import jax
    import numpy as np

    from moejax.models import param_counts
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.config import train_settings
    from moejax.training.gradients import gradient_fn, gradient_noise
    from moejax.training.loop import build
    from moejax.training.metrics import to_python
    from moejax.training.steps import TrainState

    model, train_data, eval_data, meta = build(config)
    s = train_settings(config)
    grad = gradient_fn(model, meta.task, objective=s["objective"])
    ckpt = Checkpointer(workdir, keep=s["keep_checkpoints"], async_save=False)
    points = []
    try:
        for step in config_lib.measure_steps(s["steps"]):
            raw = ckpt.restore_raw(step)
            state = TrainState(step=raw["step"], params=raw["params"], opt_state=None,
                               moe_state=raw.get("moe_state") or {}, rng=raw["rng"])
            grads, ept = [], []
            for j in range(step, step + GRAD_BATCHES):
                g, m = grad(state, {k: jax.numpy.asarray(v) for k, v in train_data.batch(j).items()})
                if not int(m["finite"]):
                    raise FloatingPointError(f"{workdir}: non-finite gradient at step {step}, batch {j}")
                grads.append(g)
                ept.append([float(x) for x in m["experts_per_token"]])
            points.append({"step": step, "groups": gradient_noise(grads),
                           "experts_per_token": np.mean(ept, 0).tolist()})
    finally:
        ckpt.close()
    routing = routing_on_test_set(model, state, eval_data, meta.task)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in logged if r["split"] == "train"]
    ept_log = np.asarray([r["experts_per_token"] for r in train], float)  # [records, layers]
    counts = param_counts(model, jax.ShapeDtypeStruct((1, *meta.input_shape), np.float32))
    layers = [{"num_experts": int(l["num_experts"]), "k": int(l["router"]["k"])} for l in config.model.layers]
    return {
        "final_eval": {k: to_python(v) for k, v in final.items() if k not in ("expert_load",)},
        "layers": layers,
        "grad_noise": points,
        "test_routing": routing,
        "grad_batches": GRAD_BATCHES,
        "experts_per_token_train": {"mean": ept_log.mean(0).tolist(), "last": ept_log[-1].tolist(),
                                    "steps": [r["step"] for r in train]},
        "train_curve": [{"step": r["step"], "loss": r["loss"], "accuracy": r["accuracy"]} for r in train],
        "params": {"total": counts.total, "max_active": counts.active, "routed_experts": counts.routed_experts},
    }


if __name__ == "__main__":
    main()
