"""experiments/smoe_dropout: claim (b)'s pre-registered rule in the over-fitting regime (report.py) on synthetic
records and the overfit preset's config. The tiny sweep end to end (with the training-bytes score) and the
dirty-tree refusal are tests/test_experiments.py's."""
import pathlib

import pytest

from moejax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"
R, P, N, T = sweep.OUTCOMES


def _load(name: str):
    return sweep.load_sibling(str(ROOT / "smoe_dropout" / "run.py"), "smoe_dropout", name)


def _rec(variant, seed, val, train):
    moe = variant == "smoe_dropout"
    return {"variant": variant, "seed": seed, "final_eval": {"loss": val}, "train_fit": {"loss": train},
            "eval_by_k": {str(k): {"loss": val + (0.3 if k < 8 else 0.0)} for k in range(1, 9)} if moe else {}}


def _runs(smoe, dense=2.60, dropout=2.40, train=0.9, sd=0.01, seeds=range(5)):
    """5 seeds; a seed effect shared by all variants plus an alternating wobble of ``sd`` on smoe_dropout."""
    out = []
    for s in seeds:
        base = 0.02 * (s % 3)
        out += [_rec("dense", s, dense + base, train), _rec("dense_dropout", s, dropout + base, train + 0.5),
                _rec("smoe_dropout", s, smoe + base + sd * (-1) ** s, train + 0.6)]
    return out


@pytest.mark.parametrize("runs,expected", [
    (_runs(2.30), R),                       # beats dense and dense + dropout
    (_runs(2.40), R),                       # beats dense, level with dropout
    (_runs(2.50), P),                       # beats dense, clearly worse than dropout
    (_runs(2.62), N),                       # not better than dense
    (_runs(2.80), N),                       # clearly worse than dense
    (_runs(2.30, train=2.5), T),            # dense does not over-fit (gap 0.1 < MIN_GAP)
    (_runs(2.30, dropout=2.60), T),         # dropout does not pay: not a regime where regularising can win
    (_runs(2.60, sd=0.08), T),              # inconclusive and too wide to resolve 0.03
    (_runs(2.30)[:3], T),                   # one seed: no interval
])
def test_claim_b_rule(runs, expected):
    report = _load("report")
    result = report.claim_b(runs)
    assert result["outcome"] == expected
    assert f"**{expected}**" in report.verdict_table(result)


def test_claim_b_statistics_by_hand():
    report = _load("report")
    result = report.claim_b(_runs(2.30))
    # smoe_dropout at k = 8 (not its k = 1..7 losses, 0.3 higher) minus dense, per seed: -0.30 + wobble
    assert result["primary"]["per_seed"] == pytest.approx([-0.29, -0.31, -0.29, -0.31, -0.29])
    assert result["secondary"]["dense_dropout - dense"]["mean"] == pytest.approx(-0.20)
    assert result["controls"]["overfit"]["min_gap"] == pytest.approx(1.70)
    assert report.claim_b([r for r in _runs(2.3) if r["variant"] != "dense"])["outcome"] == "not run"


def test_overfit_preset_config():
    config = _load("config")
    assert "overfit" in config.REFUSE_DIRTY and "overfit" in config.FIT_PRESETS
    assert len(config.SEEDS["overfit"]) >= 5
    for variant in config.VARIANTS:
        cfg, full = config.get_config(f"overfit,{variant}"), config.get_config(f"full,{variant}")
        assert cfg.data.train_split == "train[:1%]" and full.data.train_split == "train"
        assert cfg.model.to_dict() == full.model.to_dict() and cfg.train.eval_steps == full.train.eval_steps
        assert cfg.data.eval_batch_size == full.data.eval_batch_size and "eval_split" not in cfg.data
