"""The MoQE sweep: variants x seeds -> results/<preset>/*.json, summary.json, table.md; decision rules applied.

nice -n 10 python experiments/moqe/run.py --preset=full --threads=1 [--variants=moe,dense] [--seeds=0,1]
python experiments/moqe/run.py --preset=full --table          # tables and verdicts of the results on disk

Each run trains with ``moejax.training.loop.train_and_evaluate`` (the library's trainer) in its own workdir; then
the final parameters are quantized with :func:`moejax.surgery.quantize.quantize_tree` (weight-only, symmetric
round-to-nearest per output channel, fake quant) at each of ``config.BITS`` for each parameter set of
``SELECTORS`` that the variant has, and every quantized model is evaluated on the same first
``train.eval_steps`` validation batches as the unquantized one (mean next-byte cross-entropy, nats/byte). Nothing
is trained after quantization (the paper's "without any additional training"). A run whose JSON exists is
skipped, so a killed sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence

# This checkout's moejax, not whichever one an editable install points to: the code that runs must be the code
# whose commit the record names (PROTOCOL.md, "Provenance").
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from moejax import sweep  # noqa: E402

# Every threshold of the decision rules (README.md, "Decision rules"), named once.
MIN_SEEDS = 4            # of 5: a direction must hold in at least this many seeds
MUCH = 0.5               # "much more robust": mean expert increase at most this fraction of the FFN increase
MEASURABLE = 0.01        # nats/byte: a mean increase below this is "not informative" at that bit width
DECIDING_BITS = (3, 2)   # the low-bit regime the claims are decided at


def _router(path: str) -> bool:
    return "router" in path.split("/")


def non_expert(path: str) -> bool:
    """Every weight matrix of an MoE model except its routed experts and routers: attention projections, the
    dense FFN blocks (and shared experts, none here). Embeddings, norms and biases are never quantized."""
    from moejax.surgery.quantize import all_weights, experts_only
    return all_weights(path) and not experts_only(path) and not _router(path)


def non_ffn(path: str) -> bool:
    """Every weight matrix of a dense model except its FFNs: the attention projections."""
    from moejax.surgery.quantize import all_weights, dense_ffn_only
    return all_weights(path) and not dense_ffn_only(path)


def ffn_in_blocks(blocks: Sequence[int]) -> Callable[[str], bool]:
    """The dense FFN matrices of the given blocks only (``.../block_<i>/ffn/w_*``)."""
    from moejax.surgery.quantize import dense_ffn_only
    names = {f"block_{i}" for i in blocks}

    def select(path: str) -> bool:
        return dense_ffn_only(path) and bool(names & set(path.split("/")))
    return select


def selectors(moe: bool, moe_blocks: Sequence[int]) -> dict[str, Callable[[str], bool]]:
    """The parameter sets quantized in a model. MoE: ``experts`` (i), ``dense_ffn`` (its own dense FFN blocks),
    ``non_expert`` (iii), ``all``. Dense: ``ffn_moe_blocks`` ((ii): the FFNs of the blocks that are MoE blocks in
    the MoE model, so the same positions and the same active weights per token as (i)), ``dense_ffn`` (all its
    FFNs), ``non_ffn`` (attention), ``all``."""
    from moejax.surgery.quantize import all_weights, dense_ffn_only, experts_only
    if moe:
        return {"experts": experts_only, "dense_ffn": dense_ffn_only, "non_expert": non_expert, "all": all_weights}
    return {"ffn_moe_blocks": ffn_in_blocks(moe_blocks), "dense_ffn": dense_ffn_only, "non_ffn": non_ffn,
            "all": all_weights}


def quantization_sweep(model, variables: Mapping[str, Any], batches: Sequence[Mapping[str, Any]],
                       sets: Mapping[str, Callable[[str], bool]], bits: Sequence[int]) -> dict[str, Any]:
    """``{"loss": unquantized, "sets": {name: {bits: {loss, increase, relative_error, num_params}}}}``."""
    from moejax.surgery.quantize import quantization_error, quantize_tree
    loss_fn = sweep.lm_loss_fn(model)
    base = loss_fn(variables, batches)
    out: dict[str, Any] = {}
    for name, select in sets.items():
        out[name] = {}
        for b in bits:
            qparams = quantize_tree(variables["params"], b, select=select)
            err = quantization_error(variables["params"], qparams, select)
            loss = loss_fn({**variables, "params": qparams}, batches)
            out[name][str(b)] = {"loss": loss, "increase": loss - base, "relative_error": err["relative_error"],
                                 "num_params": err["num_params"]}
    return {"loss": base, "sets": out}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep.parser("moqe", __doc__.splitlines()[0], compile_cache=True)
    return p.parse_args(argv)


def load_sibling(name: str):
    return sweep.load_sibling(__file__, "moqe", name)


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
    if args.preset == "pilot":
        args.variants = args.variants or ",".join(config_lib.PILOT_VARIANTS)
        args.results = args.results or str(REPO / "experiments" / "moqe" / "pilot")
    variants, seeds, results = sweep.selection(args, config_lib, __file__)
    if args.table:
        summary = summarize(sweep.load_runs(results, config_lib.VARIANTS))
        print(report(summary))
        return summary
    command = sweep.command_line(__file__, argv)

    def measure(config, state, final, variant, seed) -> dict:
        start = time.perf_counter()
        pipeline = data_lib.from_config(config.data)
        model = build_model(config.model, vocab_size=pipeline.meta.vocab_size)
        variables = {"params": state["params"], **state["moe_state"]}
        batches = [b for _, b in zip(range(int(config.train.eval_steps)), pipeline.eval)]
        counts = param_counts(model, jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32))
        sweep_out = quantization_sweep(model, variables, batches,
                                       selectors(config.model.moe is not None,
                                                 config_lib.moe_blocks(config.model.num_layers)), config_lib.BITS)
        return {
            "final_eval": {k: to_python(v) for k, v in final.items()},
            "params": {"total": counts.total, "active": counts.active, "routed_experts": counts.routed_experts},
            "quantization": sweep_out, "bits": list(config_lib.BITS),
            "quantization_wall_clock_s": time.perf_counter() - start,
        }

    def after(record: dict, workdir) -> None:
        q = record["quantization"]
        cells = "; ".join(f"{name} 2-bit {v['2']['increase']:+.4f}" for name, v in q["sets"].items() if "2" in v)
        print(f"{record['variant']} seed {record['seed']}: val loss {q['loss']:.4f}; {cells} "
              f"({record['wall_clock_s']:.0f} s)", flush=True)

    runs = sweep.run_all(args, "moqe", config_lib, variants, seeds, results, command, measure, after)
    runs = sweep.load_runs(results, config_lib.VARIANTS)
    summary = summarize(runs)
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "table.md").write_text(report(summary) + "\n")
    print(report(summary))
    return summary


# ----------------------------------------------------------------------------- summary and decision rules

def _increase(run: dict, name: str, bits: int | str) -> float:
    return run["quantization"]["sets"][name][str(bits)]["increase"]


def _paired(runs: list[dict], a: str, b: str, fa: Callable[[dict], float], fb: Callable[[dict], float]
            ) -> dict[str, Any] | None:
    """``fa(run of variant a) - fb(run of variant b)`` per common seed, with mean, std and the seeds where < 0."""
    ra = {r["seed"]: r for r in runs if r["variant"] == a}
    rb = {r["seed"]: r for r in runs if r["variant"] == b}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = [fa(ra[s]) - fb(rb[s]) for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, "negative": sum(d < 0 for d in diffs), **sweep.mean_std(diffs),
            "ci95": sweep.ci95(diffs)}


def summarize(runs: list[dict]) -> dict:
    """Per variant: validation loss and the loss increase of every (parameter set, bits), mean ± std over seeds;
    paired by seed: the comparisons of the two claims and their verdicts under the pre-registered rules."""
    out: dict[str, Any] = {"variants": {}, "comparisons": {}}
    bits = runs[0]["bits"] if runs else []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        sets = rs[0]["quantization"]["sets"]
        out["variants"][variant] = {
            "seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
            "loss": sweep.mean_std([r["quantization"]["loss"] for r in rs]),
            "increase": {n: {str(b): sweep.mean_std([_increase(r, n, b) for r in rs]) for b in bits} for n in sets},
            "relative_error": {n: {str(b): sweep.mean_std([r["quantization"]["sets"][n][str(b)]["relative_error"]
                                                           for r in rs]) for b in bits} for n in sets},
            "wall_clock_s": sweep.mean_std([r["wall_clock_s"] for r in rs]),
        }
    cmp = out["comparisons"]
    for b in bits:
        # Claim 1: MoE experts-only increase minus the dense model's increase when the FFNs of the same blocks are
        # quantized (negative: the experts are more robust).
        cmp[f"experts_vs_dense_ffn_{b}"] = _paired(runs, "moe", "dense", lambda r: _increase(r, "experts", b),
                                                   lambda r: _increase(r, "ffn_moe_blocks", b))
        # Secondary: against quantizing every FFN of the dense model.
        cmp[f"experts_vs_all_dense_ffn_{b}"] = _paired(runs, "moe", "dense", lambda r: _increase(r, "experts", b),
                                                       lambda r: _increase(r, "dense_ffn", b))
        # Secondary: against the MoE model's own dense FFN blocks (same run, same active weights per token).
        cmp[f"experts_vs_own_dense_ffn_{b}"] = _paired(runs, "moe", "moe", lambda r: _increase(r, "experts", b),
                                                       lambda r: _increase(r, "dense_ffn", b))
        # Claim 2: the MoE with b-bit experts minus the unquantized dense model (negative: the MoE is better).
        for dense in ("dense", "dense_wide"):
            cmp[f"moe_experts{b}_minus_{dense}"] = _paired(
                runs, "moe", dense, lambda r: r["quantization"]["sets"]["experts"][str(b)]["loss"],
                lambda r: r["quantization"]["loss"])
    for dense in ("dense", "dense_wide"):
        cmp[f"moe_minus_{dense}"] = _paired(runs, "moe", dense, lambda r: r["quantization"]["loss"],
                                            lambda r: r["quantization"]["loss"])
    out["verdicts"] = verdicts(out)
    return out


def robustness_verdict(summary: dict, reference: str) -> dict[str, Any]:
    """Claim 1 under the pre-registered rule; ``reference``: ``dense`` (the dense model's FFNs in the MoE blocks'
    positions, primary), ``all_dense`` (all the dense model's FFNs) or ``own`` (the MoE model's own dense FFN
    blocks), the last two secondary."""
    v = summary["variants"]
    ref_variant, ref_set, key = {"dense": ("dense", "ffn_moe_blocks", "experts_vs_dense_ffn_{}"),
                                 "all_dense": ("dense", "dense_ffn", "experts_vs_all_dense_ffn_{}"),
                                 "own": ("moe", "dense_ffn", "experts_vs_own_dense_ffn_{}")}[reference]
    if "moe" not in v or ref_variant not in v:
        return {"verdict": "not run", "why": "missing variants"}
    per_bits, why = {}, []
    for b in DECIDING_BITS:
        ffn = v[ref_variant]["increase"][ref_set][str(b)]["mean"]
        exp = v["moe"]["increase"]["experts"][str(b)]["mean"]
        pair = summary["comparisons"][key.format(b)]
        more = pair is not None and pair["negative"] >= min(MIN_SEEDS, len(pair["seeds"]))
        much = more and exp <= MUCH * ffn
        per_bits[str(b)] = {"ffn_increase": ffn, "experts_increase": exp, "ratio": exp / ffn if ffn else None,
                            "seeds_experts_lower": None if pair is None else pair["negative"],
                            "informative": ffn >= MEASURABLE, "more_robust": more, "much_more_robust": much}
        why.append(f"{b}-bit: experts {exp:+.4f} vs FFN {ffn:+.4f} nats/byte, experts lower in "
                   f"{per_bits[str(b)]['seeds_experts_lower']} seeds")
    # A bit width where the reference FFNs barely move (< MEASURABLE) cannot rank the two; it is left out.
    deciding = [p for p in per_bits.values() if p["informative"]]
    if not deciding:
        verdict = "not testable here"
    elif all(p["much_more_robust"] for p in deciding):
        verdict = "reproduced"
    elif all(p["more_robust"] for p in deciding) or any(p["much_more_robust"] for p in deciding):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    return {"verdict": verdict, "bits": per_bits, "why": "; ".join(why)}


def better_than_dense_verdict(summary: dict, dense: str) -> dict[str, Any]:
    """Claim 2 under the pre-registered rule, against ``dense`` (primary) or ``dense_wide`` (secondary)."""
    cmp = summary["comparisons"]
    premise = cmp.get(f"moe_minus_{dense}")
    if premise is None:
        return {"verdict": "not run", "why": f"missing moe or {dense}"}
    need = min(MIN_SEEDS, len(premise["seeds"]))

    def holds(pair: dict | None) -> bool:
        return pair is not None and pair["negative"] >= need and pair["mean"] < 0

    lowest = None
    for b in sorted(summary["variants"]["moe"]["increase"]["experts"], key=int):
        if holds(cmp[f"moe_experts{b}_minus_{dense}"]):
            lowest = int(b)
            break
    two, three = cmp[f"moe_experts2_minus_{dense}"], cmp[f"moe_experts3_minus_{dense}"]
    if not holds(premise):
        verdict = "not testable here"
    elif holds(two):
        verdict = "reproduced"
    elif holds(three):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    return {"verdict": verdict, "lowest_bits_better": lowest,
            "why": f"unquantized MoE minus {dense} {premise['mean']:+.4f} (MoE lower in {premise['negative']} seeds); "
                   f"2-bit experts minus {dense} {two['mean']:+.4f} (lower in {two['negative']}); "
                   f"3-bit {three['mean']:+.4f} (lower in {three['negative']})"}


def verdicts(summary: dict) -> dict[str, Any]:
    return {"claim1_robustness": robustness_verdict(summary, "dense"),
            "claim1_secondary_all_dense_ffn": robustness_verdict(summary, "all_dense"),
            "claim1_secondary_own_dense_ffn": robustness_verdict(summary, "own"),
            "claim2_better_than_dense": better_than_dense_verdict(summary, "dense"),
            "claim2_secondary_dense_wide": better_than_dense_verdict(summary, "dense_wide")}


def table(summary: dict) -> str:
    """Markdown: one row per (variant, quantized set): params, seeds, unquantized loss, increase at each bit width."""
    rows = ["| variant | quantized | total / active params | seeds | loss, unquantized | "
            + " | ".join(f"increase, {b}-bit" for b in _bits(summary)) + " |",
            "|---|---|---|---|---|" + "---|" * len(_bits(summary))]
    for name, v in summary["variants"].items():
        for qset, inc in v["increase"].items():
            rows.append(f"| {name} | {qset} | {v['params']['total']:,} / {v['params']['active']:,} | "
                        f"{','.join(map(str, v['seeds']))} | {sweep.pm(v['loss'], 4)} | "
                        + " | ".join(sweep.pm(inc[str(b)], 4) for b in _bits(summary)) + " |")
    return "\n".join(rows)


def _bits(summary: dict) -> list[int]:
    for v in summary["variants"].values():
        return [int(b) for b in next(iter(v["increase"].values()))]
    return []


def paired_table(summary: dict) -> str:
    rows = ["| paired by seed (a - b) | mean ± std | 95% interval of the mean | seeds with a < b | per seed |",
            "|---|---|---|---|---|"]
    for key, p in summary["comparisons"].items():
        if p is not None:
            ci = "—" if p["ci95"] is None else f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
            rows.append(f"| {key} | {sweep.pm(p, 4)} | {ci} | {p['negative']}/{len(p['seeds'])} | "
                        + ", ".join(f"{d:+.4f}" for d in p["per_seed"]) + " |")
    return "\n".join(rows)


def report(summary: dict) -> str:
    lines = [table(summary), "", paired_table(summary), ""]
    for claim, v in summary["verdicts"].items():
        lines.append(f"- {claim}: **{v['verdict']}** ({v.get('why', '')})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
