"""The pre-registered rerun of the DeepSeekMoE experiment: learning-rate selection, decision rules, tables.

run.py writes one JSON per run (``results/registered/select/`` and ``results/registered/compare/``); this module
holds what turns them into a verdict, as small pure functions of run records (unit-tested on synthetic records in
``tests/test_exp_deepseekmoe_rules.py``). Every threshold of the README's "Decision rules (pre-registered)" is named
once below.

A record (see run.py) holds ``size`` (``"d64"``), ``layout`` (``"fine_shared"``), ``lr``, ``seed``,
``val_loss = {"select": loss on SELECT_SPLIT, "compare": loss on COMPARE_SPLIT}`` (nats/byte),
``baselines = {"unigram": ..., "bigram": ...}`` (the training split's n-gram models on the comparison batches) and
``redundancy = {"0.125": {"increase": ...}, "0.250": {...}}`` for MoE layouts.

Spread is the sample standard deviation (ddof=1) over seeds; every comparison is paired by seed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from moejax import sweep

# ----------------------------------------------------------------------------- the registered thresholds
MIN_SEED_SHARE = 0.7    # a direction holds when it holds in at least 70% of the seeds (5 of 7, 4 of 5)
MAX_CI_HALF = 0.03      # resolution control: largest half-width of an inconclusive primary statistic's 95% interval
CLOSE = 0.5             # claims 2, 3: fine_shared recovers at least this share of the reference's gain over gshard
LEARN_MARGIN = 0.10     # learning control: every run's comparison loss at least this far below the unigram loss
MIN_MASK_EFFECT = 0.01  # routing control: disabling each token's top 1/8 routed experts raises the loss this much
MASK_KEY = "0.125"      # ... (the redundancy ratio the routing control reads)
OUTCOMES = sweep.OUTCOMES

# The layouts of each claim: (DeepSeekMoE, GShard baseline, reference). Claim 1 has no reference; its "partly"
# reads the segmentation-only ablation FINE where it ran.
DSM, BASE, FINE = "fine_shared", "gshard", "fine"
REFERENCE = {"2": "gshard_x1.5", "3": "dense"}
CLAIMS = {"1": "at equal total and activated parameters DeepSeekMoE beats GShard top-2 (implied)",
          "2": "DeepSeekMoE achieves comparable performance with GShard x1.5",
          "3": "DeepSeekMoE nearly approaches the performance of its dense counterpart"}
PAPER = {"1": "< 0, implied by the abstract (DeepSeekMoE 2B vs GShard 2B); values not read",
         "2": "about 0: 'DeepSeekMoE 2B achieves comparable performance with GShard 2.9B, which has 1.5 times the "
              "expert parameters and computation' (abstract); values not read",
         "3": "small: 'DeepSeekMoE 2B nearly approaches the performance of its dense counterpart with the same "
              "number of total parameters' (abstract); values not read"}


# ----------------------------------------------------------------------------- record access
def compare_loss(run: Mapping[str, Any]) -> float:
    return float(run["val_loss"]["compare"])


def select_loss(run: Mapping[str, Any]) -> float:
    return float(run["val_loss"]["select"])


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


# ----------------------------------------------------------------------------- learning-rate selection
def choose_lr(runs: Sequence[Mapping[str, Any]], allowed: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """The learning rate of one layout at one size, from its selection runs (README "LR selection").

    Statistic: per learning rate, the mean over the selection ``seeds`` of the loss on the selection split (a
    diverged run counts as +inf); only learning rates with a run for every selection seed count. Choice: the
    smallest mean; an exact tie goes to the smaller learning rate. ``at_edge``: the choice is the smallest or the
    largest learning rate run. ``next``: when at an edge, the next factor-2 step beyond it if ``allowed`` (the
    extended grid, ``config.lr_grid()``) holds it, else None: run.py runs it and chooses again.
    """
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["seed"] in seeds:
            by_lr.setdefault(float(r["lr"]), []).append(_finite(select_loss(r)))
    complete = {lr: v for lr, v in by_lr.items() if len(v) == len(set(seeds))}
    if not complete:
        return {"lr": None, "losses": {}, "grid": [], "at_edge": False, "next": None}
    means = {lr: sum(v) / len(v) for lr, v in complete.items()}
    lr = min(means, key=lambda x: (means[x], x))
    grid = sorted(means)
    at_edge = len(grid) < 3 or lr in (grid[0], grid[-1])
    nxt = None
    if at_edge:
        beyond = [x for x in allowed if (x < lr if lr == grid[0] else x > lr)]
        if beyond:
            nxt = max(beyond) if lr == grid[0] else min(beyond)
    return {"lr": lr, "losses": {sweep_tag(x): means[x] for x in grid}, "grid": grid, "at_edge": at_edge,
            "next": nxt}


def sweep_tag(lr: float) -> str:
    return f"{float(lr):g}"


def selection(select_runs: Sequence[Mapping[str, Any]], allowed: Mapping[str, Sequence[float]],
              seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``{size: {layout: choose_lr(...)}}`` over the selection runs on disk; ``allowed[size]``: that size's extended
    grid (``config.lr_grid(size)``)."""
    out: dict[str, dict[str, Any]] = {}
    for r in select_runs:
        out.setdefault(r["size"], {}).setdefault(r["layout"], None)
    for size, layouts in out.items():
        for layout in layouts:
            rs = [r for r in select_runs if r["size"] == size and r["layout"] == layout]
            layouts[layout] = choose_lr(rs, allowed[size], seeds)
    return out


# ----------------------------------------------------------------------------- paired statistics
def paired(groups: Sequence[Sequence[Mapping[str, Any]]], f: Callable[..., float]) -> dict[str, Any] | None:
    """``f(run of group 0, run of group 1, ...)`` at every seed all groups have (:func:`moejax.sweep.paired`)."""
    return sweep.paired(groups, f)


def clearly_positive(p: Mapping[str, Any] | None) -> bool:
    """> 0 in at least MIN_SEED_SHARE of the seeds and the 95% interval of the mean above 0."""
    return sweep.clearly(p, +1, MIN_SEED_SHARE)


def clearly_negative(p: Mapping[str, Any] | None) -> bool:
    """< 0 in at least MIN_SEED_SHARE of the seeds and the 95% interval of the mean below 0."""
    return sweep.clearly(p, -1, MIN_SEED_SHARE)


def gap_statistic(close: float = CLOSE) -> Callable[[Mapping, Mapping, Mapping], float]:
    """``(fine_shared, gshard, reference) -> loss(fs) - [loss(gshard) - close * (loss(gshard) - loss(reference))]``:
    negative when fine_shared recovers more than ``close`` of the reference's gain over gshard (at ``close = 1/2``:
    fine_shared is better than the midpoint of gshard and the reference)."""
    def f(fs, base, ref):
        g, r = compare_loss(base), compare_loss(ref)
        return compare_loss(fs) - (g - close * (g - r))
    return f


def difference(a: Mapping, b: Mapping) -> float:
    return compare_loss(a) - compare_loss(b)


# ----------------------------------------------------------------------------- positive controls
def learn_control(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every run learned beyond the unigram model of the training bytes: comparison loss <= unigram - LEARN_MARGIN."""
    if not runs:
        return {"passes": False, "why": "not run"}
    gaps = [r["baselines"]["unigram"] - compare_loss(r) for r in runs]
    ok = all(math.isfinite(g) and g >= LEARN_MARGIN for g in gaps)
    return {"passes": ok, "min_gap": min(gaps), "why": f"unigram - loss >= {min(gaps):.3f} in all {len(runs)} runs "
            f"({'>=' if ok else '<'} {LEARN_MARGIN} required)"}


def routing_control(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The routed experts carry the computation: in every MoE run, disabling each token's top 1/8 of the routed
    experts raises the comparison loss by at least MIN_MASK_EFFECT (dense runs have no routing and are skipped)."""
    moe = [r for r in runs if r.get("redundancy")]
    if not moe:
        return {"passes": False, "why": "no MoE run"}
    inc = [r["redundancy"][MASK_KEY]["increase"] for r in moe]
    ok = all(math.isfinite(x) and x >= MIN_MASK_EFFECT for x in inc)
    return {"passes": ok, "min_increase": min(inc),
            "why": f"loss increase with the top 1/8 routed experts disabled >= {min(inc):.3f} in all {len(moe)} MoE "
                   f"runs ({'>=' if ok else '<'} {MIN_MASK_EFFECT} required)"}


def lr_control(choices: Mapping[str, Mapping[str, Any]], layouts: Iterable[str]) -> dict[str, Any]:
    """Each layout's chosen learning rate is inside its grid (not at an edge, after any extension)."""
    bad = [l for l in layouts if l not in choices or choices[l]["lr"] is None or choices[l]["at_edge"]]
    lrs = ", ".join(f"{l} {sweep_tag(choices[l]['lr'])}" for l in layouts if l in choices and choices[l]["lr"])
    return {"passes": not bad, "why": f"chosen {lrs}" + (f"; at an edge or missing: {bad}" if bad else ", all inside")}


def premise_control(p: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """The reference is the stronger model the claim presumes: loss(gshard) - loss(reference) clearly positive."""
    return {"passes": clearly_positive(p), "why": f"{what}: {_ci(p)}"}


def resolution_control(p: Mapping[str, Any] | None) -> dict[str, Any]:
    """The primary statistic is resolved (:func:`moejax.sweep.resolution_control` at MAX_CI_HALF)."""
    return sweep.resolution_control(p, MAX_CI_HALF)


_ci = sweep.format_paired


_outcome = sweep.outcome_if_controls_pass


# ----------------------------------------------------------------------------- the claims, per model size
def claim_1(runs_of: Callable[[str], list], choices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Claim 1 at one size: ``loss(fine_shared) - loss(gshard)`` per seed (primary). Reproduced: clearly negative.
    Partly: not clearly negative, but ``loss(fine) - loss(gshard)`` clearly negative (segmentation alone wins; only
    where ``fine`` ran). Not reproduced: otherwise."""
    dsm, base = runs_of(DSM), runs_of(BASE)
    primary = paired([dsm, base], difference)
    if primary is None:
        return {"outcome": "not run", "why": f"missing {DSM} or {BASE}"}
    fine = paired([runs_of(FINE), base], difference) if runs_of(FINE) else None
    controls = {"learn": learn_control(dsm + base), "routing": routing_control(dsm + base),
                "lr": lr_control(choices, (DSM, BASE)), "resolution": resolution_control(primary)}

    def decide() -> str:
        if clearly_negative(primary):
            return "reproduced"
        if clearly_negative(fine):
            return "partly reproduced"
        return "not reproduced"

    return {"outcome": _outcome(controls, decide), "primary": primary, "secondary": {f"{FINE} - {BASE}": fine},
            "controls": controls,
            "why": f"loss {DSM} - {BASE}: {_ci(primary)}; {FINE} - {BASE}: {_ci(fine)}"}


def _claim_reference(claim: str, runs_of: Callable[[str], list],
                     choices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Claims 2 and 3 at one size, reference ``REFERENCE[claim]``: per seed ``gap_statistic()(fs, gshard, ref)``
    (primary). Reproduced: clearly negative (fine_shared recovers more than CLOSE of the reference's gain over
    gshard). Partly: not, but ``loss(fine_shared) - loss(gshard)`` clearly negative (some of the gain). Not
    reproduced: otherwise. Premise control: ``loss(gshard) - loss(ref)`` clearly positive."""
    ref = REFERENCE[claim]
    dsm, base, other = runs_of(DSM), runs_of(BASE), runs_of(ref)
    primary = paired([dsm, base, other], gap_statistic())
    if primary is None:
        return {"outcome": "not run", "why": f"missing {DSM}, {BASE} or {ref}"}
    gain = paired([base, other], difference)
    versus_base = paired([dsm, base], difference)
    versus_ref = paired([dsm, other], difference)
    recovered = None
    if gain is not None and versus_base is not None and gain["mean"] != 0:
        recovered = -versus_base["mean"] / gain["mean"]
    controls = {"learn": learn_control(dsm + base + other), "routing": routing_control(dsm + base + other),
                "lr": lr_control(choices, (DSM, BASE, ref)),
                "premise": premise_control(gain, f"loss {BASE} - {ref}"), "resolution": resolution_control(primary)}

    def decide() -> str:
        if clearly_negative(primary):
            return "reproduced"
        if clearly_negative(versus_base):
            return "partly reproduced"
        return "not reproduced"

    share = "—" if recovered is None else f"{recovered:+.2f}"
    return {"outcome": _outcome(controls, decide), "primary": primary,
            "secondary": {f"{BASE} - {ref}": gain, f"{DSM} - {BASE}": versus_base, f"{DSM} - {ref}": versus_ref},
            "share_recovered": recovered, "controls": controls,
            "why": f"loss {DSM} - midpoint({BASE}, {ref}) (CLOSE = {CLOSE}): {_ci(primary)}; share of the {ref} gain "
                   f"recovered (of means): {share}; {DSM} - {ref}: {_ci(versus_ref)}"}


def claim_2(runs_of, choices):
    return _claim_reference("2", runs_of, choices)


def claim_3(runs_of, choices):
    return _claim_reference("3", runs_of, choices)


combine = sweep.combine_outcomes     # over model sizes / datasets (moejax.sweep)


def verdicts(compare_runs: Sequence[Mapping[str, Any]],
             choices: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{claim: {"verdict", "sizes": {size: claim_x(...)}}}`` for every size in ``compare_runs`` (the comparison
    runs at the chosen learning rates) with ``choices`` = :func:`selection`'s output."""
    sizes = list(dict.fromkeys(r["size"] for r in compare_runs))
    out: dict[str, Any] = {}
    for claim, fn in (("1", claim_1), ("2", claim_2), ("3", claim_3)):
        per = {}
        for size in sizes:
            def runs_of(layout, size=size):
                return [r for r in compare_runs if r["size"] == size and r["layout"] == layout]
            per[size] = fn(runs_of, choices.get(size, {}))
        out[claim] = {"claim": CLAIMS[claim], "verdict": combine([v["outcome"] for v in per.values()]),
                      "sizes": per, "paper": PAPER[claim]}
    return out


# ----------------------------------------------------------------------------- summary and tables
def summarize(compare_runs: Sequence[Mapping[str, Any]], select_runs: Sequence[Mapping[str, Any]],
              allowed: Mapping[str, Sequence[float]], select_seeds: Sequence[int]) -> dict[str, Any]:
    """Per size and layout: chosen learning rate, parameters, comparison and selection losses, redundancy, wall-clock;
    the learning-rate selection; the redundancy comparison (reported, not deciding); the verdicts."""
    choices = selection(select_runs, allowed, select_seeds)
    rows: dict[str, dict[str, Any]] = {}
    for r in compare_runs:
        rows.setdefault(r["size"], {}).setdefault(r["layout"], [])
    for size, layouts in rows.items():
        for layout in layouts:
            rs = [r for r in compare_runs if r["size"] == size and r["layout"] == layout]
            row = {"lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "params": rs[0].get("params"),
                   "compare_loss": sweep.mean_std([compare_loss(r) for r in rs]),
                   "select_loss": sweep.mean_std([select_loss(r) for r in rs]),
                   "unigram": rs[0]["baselines"]["unigram"], "bigram": rs[0]["baselines"]["bigram"],
                   "wall_clock_s": sweep.mean_std([r.get("wall_clock_s", float("nan")) for r in rs])}
            for key in ("0.125", "0.250"):
                if all(r.get("redundancy") for r in rs):
                    row[f"increase_{key}"] = sweep.mean_std([r["redundancy"][key]["increase"] for r in rs])
            layouts[layout] = row
    redundancy = {}
    for size in rows:
        def runs_of(layout, size=size):
            return [r for r in compare_runs if r["size"] == size and r["layout"] == layout]
        for other in (DSM, FINE):
            for key in ("0.125", "0.250"):
                p = paired([runs_of(other), runs_of(BASE)],
                           lambda a, b, key=key: a["redundancy"][key]["increase"] - b["redundancy"][key]["increase"])
                if p is not None:
                    redundancy[f"{size} {other} - {BASE} at {key}"] = p
    return {"layouts": rows, "selection": choices, "redundancy": redundancy,
            "verdicts": verdicts(compare_runs, choices)}


def selection_table(summary: Mapping[str, Any]) -> str:
    """Markdown: per size and layout, the mean selection loss at each learning rate and the choice."""
    lrs = sorted({float(x) for s in summary["selection"].values() for c in s.values() for x in c["losses"]})
    lines = ["| size | layout | " + " | ".join(f"lr {sweep_tag(x)}" for x in lrs) + " | chosen | at an edge |",
             "|---|---|" + "---|" * len(lrs) + "---|---|"]
    for size, layouts in summary["selection"].items():
        for layout, c in layouts.items():
            cells = [f"{c['losses'][sweep_tag(x)]:.4f}" if sweep_tag(x) in c["losses"] else "—" for x in lrs]
            chosen = "—" if c["lr"] is None else sweep_tag(c["lr"])
            lines.append(f"| {size} | {layout} | " + " | ".join(cells) + f" | {chosen} | "
                         f"{'yes' if c['at_edge'] else 'no'} |")
    return "\n".join(lines)


def table(summary: Mapping[str, Any]) -> str:
    """Markdown: per size and layout, learning rate, parameters, seeds, losses, redundancy, wall-clock."""
    pm = lambda s: sweep.pm(s, digits=4)  # noqa: E731
    lines = ["| size | layout | lr | total params | active params | seeds | loss, comparison split (nats/byte) "
             "| loss, selection split | increase, top 1/8 routed disabled | top 2/8 disabled | unigram / bigram "
             "| wall-clock per run (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, layouts in summary["layouts"].items():
        for layout, r in layouts.items():
            params = r["params"] or {}
            inc = [pm(r[k]) if k in r else "—" for k in ("increase_0.125", "increase_0.250")]
            lines.append(f"| {size} | {layout} | {sweep_tag(r['lr'])} | {params.get('total', 0):,} | "
                         f"{params.get('active', 0):,} | {','.join(map(str, r['seeds']))} | {pm(r['compare_loss'])} | "
                         f"{pm(r['select_loss'])} | {inc[0]} | {inc[1]} | {r['unigram']:.3f} / {r['bigram']:.3f} | "
                         f"{r['wall_clock_s']['mean']:.0f} |")
    return "\n".join(lines)


def verdict_table(summary: Mapping[str, Any]) -> str:
    """Markdown: per claim and size the outcome, controls, primary statistic; the combined verdict; the paper."""
    rows = sweep.verdict_rows(summary.get("verdicts") or {}, "sizes", "size")
    for name, p in summary.get("redundancy", {}).items():
        rows.append(f"| redundancy (reported, not deciding) | {name} | — | — | {_ci(p)} | DeepSeekMoE's loss rises "
                    f"more (Section 4.5 as summarised in the README; values not read) |")
    return "\n".join(rows)
