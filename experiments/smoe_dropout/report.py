"""Claim (b)'s pre-registered decision rule in the over-fitting regime (preset ``overfit``; README "Claim (b) where
the models over-fit"): small pure functions of run records, unit-tested on synthetic records in
``tests/test_exp_smoe_dropout_rules.py``. Every threshold is named once below.

A record (run.py) holds ``variant``, ``seed``, ``final_eval = {"loss": validation loss at the trainer's k}``,
``eval_by_k = {"1": {"loss": ...}, ..., "8": {...}}`` for MoE variants and ``train_fit = {"loss": the same model on
its training bytes}``. Losses in nats/byte; lower is better; every comparison is paired by seed.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from moejax import sweep

MIN_SEED_SHARE = 0.7   # a direction holds in at least 70% of the seeds (4 of 5)
MIN_GAP = 0.2          # over-fitting control: dense's validation loss exceeds its training loss by this in every seed
MAX_CI_HALF = 0.03     # resolution control: largest half-width of an inconclusive primary interval
SMOE, DENSE, DROPOUT = "smoe_dropout", "dense", "dense_dropout"
CLAIM_B = "at full k, SMoE-Dropout beats dense training of the same parameter count"
PAPER_B = ("BERT: 'consistent improvements of {1.03%, 0.78%, 1.09%}' over its densely trained counterpart on "
           "ASDiv-A, MAWPS, SVAMP (abstract; fine-tuned accuracy, not a loss)")


def full_k_loss(run: Mapping[str, Any]) -> float:
    """Validation loss with every expert active (the largest inference k); dense variants: their one loss."""
    by_k = run.get("eval_by_k") or {}
    if by_k:
        return float(by_k[max(by_k, key=int)]["loss"])
    return float(run["final_eval"]["loss"])


def gap(run: Mapping[str, Any]) -> float:
    """Generalisation gap: validation loss minus the same model's loss on its training bytes."""
    return float(run["final_eval"]["loss"]) - float(run["train_fit"]["loss"])


def difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    return full_k_loss(a) - full_k_loss(b)


def overfit_control(dense: Sequence[Mapping[str, Any]], dropout_gain: Mapping[str, Any] | None) -> dict[str, Any]:
    """The regime the claim needs: ``dense`` over-fits (gap >= MIN_GAP in every seed) and standard dropout pays
    (``loss(dense_dropout) - loss(dense)`` clearly negative)."""
    if not dense:
        return {"passes": False, "why": "no dense run"}
    gaps = [gap(r) for r in dense]
    overfits = all(math.isfinite(g) and g >= MIN_GAP for g in gaps)
    pays = sweep.clearly(dropout_gain, -1, MIN_SEED_SHARE)
    return {"passes": overfits and pays, "min_gap": min(gaps),
            "why": f"dense gap (val - train) >= {min(gaps):.3f} in all {len(gaps)} seeds ({'>=' if overfits else '<'} "
                   f"{MIN_GAP} required); {DROPOUT} - {DENSE}: {sweep.format_paired(dropout_gain)} "
                   f"({'clearly negative' if pays else 'not clearly negative'})"}


def resolution_control(p: Mapping[str, Any] | None) -> dict[str, Any]:
    """The primary is resolved (:func:`moejax.sweep.resolution_control` at MAX_CI_HALF)."""
    return sweep.resolution_control(p, MAX_CI_HALF)


def claim_b(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Primary: ``loss(smoe_dropout at k=E) - loss(dense)`` per seed. Reproduced: clearly negative and
    ``loss(smoe_dropout) - loss(dense_dropout)`` not clearly positive (at least level with standard dropout).
    Partly: clearly negative, but clearly worse than dense + dropout. Not reproduced: not clearly negative.
    Controls: over-fitting (the premise), resolution. Any control failing: not testable here."""
    of = {v: [r for r in runs if r["variant"] == v] for v in (SMOE, DENSE, DROPOUT)}
    primary = sweep.paired([of[SMOE], of[DENSE]], difference)
    if primary is None:
        return {"outcome": "not run", "why": f"missing {SMOE} or {DENSE}"}
    versus_dropout = sweep.paired([of[SMOE], of[DROPOUT]], difference)
    dropout_gain = sweep.paired([of[DROPOUT], of[DENSE]], difference)
    controls = {"overfit": overfit_control(of[DENSE], dropout_gain), "resolution": resolution_control(primary)}
    if not all(c["passes"] for c in controls.values()):
        outcome = "not testable here"
    elif not sweep.clearly(primary, -1, MIN_SEED_SHARE):
        outcome = "not reproduced"
    elif sweep.clearly(versus_dropout, +1, MIN_SEED_SHARE):
        outcome = "partly reproduced"
    else:
        outcome = "reproduced"
    return {"claim": CLAIM_B, "paper": PAPER_B, "outcome": outcome, "primary": primary,
            "secondary": {f"{SMOE} - {DROPOUT}": versus_dropout, f"{DROPOUT} - {DENSE}": dropout_gain},
            "controls": controls,
            "why": f"{SMOE} (k=E) - {DENSE}: {sweep.format_paired(primary)}; {SMOE} - {DROPOUT}: "
                   f"{sweep.format_paired(versus_dropout)}"}


def verdict_table(result: Mapping[str, Any]) -> str:
    """Markdown: the claim, the paper's number, ours (primary and secondary statistics), controls, outcome."""
    lines = ["| | paper (abstract) | ours |", "|---|---|---|",
             f"| (b) {result.get('claim', CLAIM_B)} | {PAPER_B} | {result['why']} |"]
    for name, c in result.get("controls", {}).items():
        lines.append(f"| control: {name} | — | {'passes' if c['passes'] else 'FAILS'}: {c['why']} |")
    lines.append(f"| **(b) verdict** | | **{result['outcome']}** |")
    return "\n".join(lines)
