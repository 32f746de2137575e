"""The DynaMoE sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md and plots.

nice -n 10 python experiments/dynamoe/run.py --preset=full --threads=1 [--variants=...] [--seeds=0,1,2]

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer), which saves a
checkpoint every 1/8 of training. Then, at each step of ``config.measure_steps`` (1/8, 1/4, 1/2 and all of
training), the checkpoint is restored and the gradient of the trainer's own objective (``make_train_step``'s
loss, through :mod:`moejax.training.gradients`) is taken on ``GRAD_BATCHES`` minibatches at those fixed
parameters: the ``GRAD_BATCHES`` training batches that follow the step in the run's own data order (distinct
examples unless they straddle an epoch boundary). The record holds their noise statistics per parameter group
(router, experts, other, all; see :func:`moejax.training.gradients.gradient_noise`) and the mean experts per
token of each layer on those batches, plus the experts/token the trainer logged during training. A persistent
compilation cache (``--compile_cache``) lets the seeds of a variant compile once. A run whose JSON exists
is skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse

from moejax import sweep

GRAD_BATCHES = 16


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("dynamoe", __doc__.splitlines()[0], compile_cache=True)
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "dynamoe", name)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    sweep.start(args)      # one XLA thread, the dirty-tree refusal of --preset=full, the compilation cache
    import json

    config_lib = load_sibling("config")
    report = load_sibling("report")
    if args.preset == "paper" and not args.variants:
        args.variants = ",".join(config_lib.PAPER_VARIANTS)
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    order = config_lib.VARIANTS + config_lib.PAPER_VARIANTS
    if args.table:
        summary = report.summarize(sweep.load_runs(results, order))
        print(report.table(summary))
        return summary
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        workdir = sweep.run_dir(args, variant, seed)
        return measure_run(config_lib, config, workdir, final)

    def after(record: dict, workdir) -> None:
        last = record["grad_noise"][-1]
        print(f"{record['variant']} seed {record['seed']}: accuracy {record['final_eval']['accuracy']:.4f}, "
              f"experts/token {[round(x, 2) for x in record['experts_per_token_train']['mean']]}, "
              f"final noise all {last['groups']['all']['noise']:.3g} router {last['groups']['router']['noise']:.3g} "
              f"({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "dynamoe", config_lib, variants, seeds, results, command, measure, after)
    runs = sweep.load_runs(results, order)  # every run of this preset on disk, not only this invocation's
    summary = report.summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report.table(summary) + "\n")
    report.plot_accuracy(summary, str(results / "accuracy.png"))
    report.plot_noise(summary, str(results / "grad_noise.png"))
    print(report.table(summary))
    return summary


def measure_run(config_lib, config, workdir, final: dict) -> dict:
    """Gradient noise at each measurement step, experts/token (logged and measured), parameter counts."""
    import json

    import jax
    import numpy as np

    from moejax.models import param_counts
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.config import train_settings
    from moejax.training.gradients import gradient_fn, gradient_noise
    from moejax.training.loop import build
    from moejax.training.metrics import to_python
    from moejax.training.steps import AuxWeights, TrainState

    model, train_data, _, meta = build(config)
    s = train_settings(config)
    weights = AuxWeights(s["load_balance_weight"], s["z_loss_weight"], s["importance_weight"],
                         s["router_entropy_weight"])
    grad = gradient_fn(model, meta.task, weights, consistency_weight=s["consistency_weight"])
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
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in logged if r["split"] == "train"]
    ept_log = np.asarray([r["experts_per_token"] for r in train], float)  # [records, layers]
    counts = param_counts(model, jax.ShapeDtypeStruct((1, *meta.input_shape), np.float32))
    layers = [{"num_experts": int(l["num_experts"]), "k": int(l["router"]["k"])} for l in config.model.layers]
    return {
        "final_eval": {k: to_python(v) for k, v in final.items() if k not in ("expert_load",)},
        "layers": layers,
        "grad_noise": points,
        "grad_batches": GRAD_BATCHES,
        "experts_per_token_train": {"mean": ept_log.mean(0).tolist(), "last": ept_log[-1].tolist(),
                                    "steps": [r["step"] for r in train]},
        "train_curve": [{"step": r["step"], "loss": r["loss"], "accuracy": r["accuracy"]} for r in train],
        "params": {"total": counts.total, "max_active": counts.active, "routed_experts": counts.routed_experts},
    }


if __name__ == "__main__":
    main()
