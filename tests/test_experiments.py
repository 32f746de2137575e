"""Smoke tests of the experiment directories: the ``tiny`` preset of each sweep end to end, plus the
paper-specific analysis code (mutual information of gates, the redundancy test's masked routing) on
hand-computed cases, and every preset/variant config validated without training."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import sweep
from moejax.config import MoEConfig, RouterConfig
from moejax.routing import Router
from moejax.models import build_model, model_config

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

ROOT = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(experiment: str, name: str):
    return sweep.load_sibling(str(ROOT / experiment / "run.py"), experiment, name)   # run.py's own names


def assert_unknown_preset_and_variant_refused(config, bad_variant: str) -> None:
    """An experiment's ``get_config`` names the field it refuses: an unknown preset, then an unknown variant."""
    with pytest.raises(ValueError, match="^preset="):
        config.get_config("huge")
    with pytest.raises(ValueError, match="^variant="):
        config.get_config(bad_variant)


def test_deep_moe_tiny_sweep_end_to_end(tmp_path):
    run = _load("deep_moe", "run")
    summary = run.main(["--preset=tiny", "--variants=dense", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "dense_seed0.json").read_text())
    assert record["seed"] == 0 and record["variant"] == "dense" and record["jax_version"] == jax.__version__
    assert 0.0 <= record["final_eval"]["accuracy"] <= 1.0 and record["final_eval"]["step"] == 20
    assert len(record["gating"]) == 2
    for layer in record["gating"]:
        assert layer["num_experts"] == 4 and math.isclose(sum(layer["top1_usage"]), 1.0, abs_tol=1e-9)
        for key in ("mi_quadrant_hard", "mi_position_hard", "mi_class_hard", "mi_quadrant_soft", "mi_class_soft"):
            assert -1e-9 <= layer[key] <= 2.0 + 1e-9  # log2(4 experts) bounds every MI here
    assert record["params"]["total"] == record["params"]["active"]  # dense mixture: k = E
    assert (tmp_path / "results" / "gating_dense.png").stat().st_size > 0
    assert summary["dense"]["seeds"] == [0]


def test_deepseekmoe_tiny_sweep_end_to_end(tmp_path):
    run = _load("deepseekmoe", "run")
    summary = run.main(["--preset=tiny", "--variants=fine_shared", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "fine_shared_seed0.json").read_text())
    assert record["final_eval"]["step"] == 10 and math.isfinite(record["final_eval"]["loss"])
    assert record["config"]["model"]["moe"]["num_experts"] == 31
    red = record["redundancy"]
    assert set(red) == {"0.125", "0.250", "unmasked_loss"}
    assert all(math.isfinite(red[k]["increase"]) for k in ("0.125", "0.250"))
    # The unmasked loss of the redundancy evaluation is the trainer's own evaluation on the same batches.
    assert red["unmasked_loss"] == pytest.approx(record["final_eval"]["loss"], rel=1e-4)
    assert summary["fine_shared"]["params"] == record["params"]


def test_mutual_information_hand_computed():
    analysis = _load("deep_moe", "analysis")
    labels = np.repeat(np.arange(4), 25)
    onehot = np.eye(4)[labels]
    # Gates determined by the label: both MIs equal H(label) = 2 bits.
    assert analysis.hard_mutual_information(onehot, labels, 4) == pytest.approx(2.0)
    assert analysis.soft_mutual_information(onehot, labels, 4) == pytest.approx(2.0)
    # Uniform gates carry no information; argmax of constant gates is a constant.
    uniform = np.full((100, 4), 0.25)
    assert analysis.soft_mutual_information(uniform, labels, 4) == pytest.approx(0.0, abs=1e-12)
    assert analysis.hard_mutual_information(uniform, labels, 4) == pytest.approx(0.0, abs=1e-12)
    # Two experts, each used by half of the labels with confidence 3/4: soft MI = 1 - H(3/4) bits.
    soft = np.where(labels[:, None] < 2, [0.75, 0.25], [0.25, 0.75])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert analysis.soft_mutual_information(soft, labels, 4) == pytest.approx(1.0 - h)
    assert analysis.hard_mutual_information(soft, labels, 4) == pytest.approx(1.0)
    maps = analysis.position_maps(onehot, np.stack([labels, labels], 1))
    assert maps.shape == (4, 17, 17) and maps[2, 2, 2] == 1.0 and np.isnan(maps[0, 0, 1])


def test_redundancy_masking_skips_each_tokens_top_experts():
    redundancy = _load("deepseekmoe", "redundancy")        # registers the experiment's own router transform
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    cfg = RouterConfig(k=2, masked_top_ratio=0.25)           # r = round(0.25 * 4) = 1 expert masked per token
    assert isinstance(cfg.transforms[0], redundancy.MaskTopExperts)
    routing = Router(4, cfg, kernel_init=lambda *a: jnp.eye(4)).apply(
        {"params": {"kernel": jnp.eye(4)}}, logits)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.expert_index), -1), [[1, 2], [1, 2]])
    # Weights stay the unmasked softmax scores of the chosen experts (not renormalised by this config).
    np.testing.assert_allclose(np.sort(np.asarray(routing.weight), -1), [[0.2, 0.3], [0.2, 0.3]], rtol=1e-5)
    with pytest.raises(ValueError, match=r"^router\.masked_top_ratio=0\.75: masking 3 of 4 experts"):
        MoEConfig(num_experts=4, router=RouterConfig(k=2, masked_top_ratio=0.75))
    with pytest.raises(ValueError, match=r"^router\.masked_top_ratio=0\.25: transform 'mask_top_experts'"):
        RouterConfig(kind="sinkhorn", masked_top_ratio=0.25)


@pytest.mark.parametrize("experiment,shape", [("deep_moe", (24, 24, 1)), ("deepseekmoe", None)])
def test_every_preset_and_variant_config_is_valid(experiment, shape):
    config = _load(experiment, "config")
    for preset in config.PRESETS:
        for variant in config.VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            typed = model_config(cfg.model, num_classes=10, vocab_size=256, input_shape=shape)
            assert cfg.train.steps >= 1 and typed is not None
    assert_unknown_preset_and_variant_refused(config, "tiny,nope")


def test_smoe_dropout_tiny_sweep_end_to_end(tmp_path, monkeypatch):
    run = _load("smoe_dropout", "run")
    monkeypatch.setattr(_load("smoe_dropout", "config"), "FIT_PRESETS", ("tiny",))   # as the overfit preset does
    summary = run.main(["--preset=tiny", "--variants=smoe_dropout", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "smoe_dropout_seed0.json").read_text())
    config = record["config"]
    assert config["model"]["moe"]["router"]["frozen"] and config["train"]["moe_k_end"] == 2
    assert record["final_eval"]["step"] == 8 and math.isfinite(record["final_eval"]["loss"])
    assert list(record["eval_by_k"]) == ["1", "2"]
    # The sweep at the trainer's evaluation k (all experts) is the trainer's own evaluation on the same batches.
    assert record["eval_by_k"]["2"]["loss"] == pytest.approx(record["final_eval"]["loss"], rel=1e-4)
    # At k = E every token goes to both experts: each gets exactly half of the token copies.
    np.testing.assert_allclose(record["eval_by_k"]["2"]["expert_load"][0], [0.5, 0.5], atol=1e-6)
    assert record["eval_by_k"]["1"]["loss"] != record["eval_by_k"]["2"]["loss"]
    row = summary["smoe_dropout"]
    assert row["loss_by_k"]["1"]["mean"] == record["eval_by_k"]["1"]["loss"]
    assert row["monotone_seeds"] == int(record["eval_by_k"]["2"]["loss"] <= record["eval_by_k"]["1"]["loss"])
    assert (tmp_path / "results" / "loss_vs_k.png").stat().st_size > 0
    # Scored on its training bytes at the trainer's k (all experts); the rule of claim (b) needs dense runs.
    assert record["train_fit"]["k"] == 2 and math.isfinite(record["train_fit"]["loss"])
    assert record["train_fit"]["loss"] != record["final_eval"]["loss"]
    assert row["gap"]["mean"] == pytest.approx(record["final_eval"]["loss"] - record["train_fit"]["loss"])
    assert summary["claim_b"]["outcome"] == "not run"
    assert "| smoe_dropout |" in (tmp_path / "results" / "table.md").read_text()


def test_smoe_dropout_monotonicity_and_table_ks():
    run = _load("smoe_dropout", "run")
    assert run.monotone_steps([3.0, 2.5, 2.5, 2.0]) == (True, 0.0)
    ok, rise = run.monotone_steps([3.0, 2.0, 2.25, 1.0])
    assert not ok and rise == pytest.approx(0.25)
    summary = {"a": {"loss_by_k": {str(k): None for k in range(1, 7)}}}
    assert run.table_ks(summary) == ["1", "2", "4", "6"]
    curve = {"a": {"loss_by_k": {"1": {"mean": 2.5, "std": 0.125}, "2": {"mean": 2.0, "std": 0.0}}}, "dense": {}}
    assert run.curve_table(curve).splitlines()[-1] == "| a | 2.5000 ± 0.1250 | 2.0000 ± 0.0000 |"
    config = _load("smoe_dropout", "config")
    for preset in config.PRESETS:
        for variant in config.VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            assert model_config(cfg.model, vocab_size=256) is not None
            moe = cfg.model.moe
            assert (moe is None) == (variant not in config.MOE_VARIANTS)
            dense_width = cfg.model.dense_hidden_dim
            if moe is not None:  # same expert parameters as the dense FFN: E experts of width F = one of E F
                assert moe.num_experts * moe.hidden_dim == dense_width
                assert moe.router.frozen == (variant != "learned_top2")
            assert (cfg.train.get("moe_k_end") is not None) == (variant == "smoe_dropout")
    assert_unknown_preset_and_variant_refused(config, "tiny,nope")


def test_dynamoe_tiny_sweep_end_to_end(tmp_path):
    run = _load("dynamoe", "run")
    config = _load("dynamoe", "config")
    summary = run.main(["--preset=tiny", "--variants=digits-dyn-descending", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}"])
    record = json.loads((tmp_path / "results" / "digits-dyn-descending_seed0.json").read_text())
    assert record["final_eval"]["step"] == 30 and 0.0 <= record["final_eval"]["accuracy"] <= 1.0
    assert [(l["num_experts"], l["k"]) for l in record["layers"]] == [(4, 2), (2, 1)]  # 6 experts, k total 3
    assert [p["step"] for p in record["grad_noise"]] == config.measure_steps(30) == [4, 8, 16, 30]
    for point in record["grad_noise"]:
        assert set(point["groups"]) == {"router", "experts", "other", "all"}
        assert all(g["noise"] > 0 and g["trace"] > 0 for g in point["groups"].values())
        # Dynamic routing: between 1 and the layer's max k experts per token, measured on the same batches.
        assert all(1.0 <= e <= l["k"] + 1e-6 for e, l in zip(point["experts_per_token"], record["layers"]))
    assert record["experts_per_token_train"]["mean"][1] == pytest.approx(1.0)  # k = 1: exactly one expert
    row = summary["variants"]["digits-dyn-descending"]
    assert row["seeds"] == [0] and row["accuracy"]["mean"] == record["final_eval"]["accuracy"]
    assert (tmp_path / "results" / "grad_noise.png").stat().st_size > 0
    assert (tmp_path / "results" / "accuracy.png").stat().st_size > 0


def test_dynamoe_configs_match_budgets_and_are_valid():
    config = _load("dynamoe", "config")
    for preset, variants in (("full", config.VARIANTS), ("paper", config.PAPER_VARIANTS)):
        for variant in variants:
            cfg = config.get_config(f"{preset},{variant}")
            layers = cfg.model.layers
            assert sum(l["num_experts"] for l in layers) == config.TOTAL_EXPERTS
            assert sum(l["router"]["k"] for l in layers) == config.TOTAL_K
            shape = {"mnist1d": (40, 1), "digits": (8, 8, 1), "cifar10": (32, 32, 3)}.get(cfg.data.name, (28, 28, 1))
            assert model_config(cfg.model, num_classes=10, input_shape=shape) is not None
            kind = "threshold" if "-dyn-" in variant else "topk"
            assert all(l["router"]["kind"] == kind for l in layers)
    # Dynamic and fixed routing at the same schedule have the same experts and max k per layer.
    dyn, top = (config.get_config(f"full,mnist1d-{r}-descending").model.layers for r in ("dyn", "top"))
    assert [(l["num_experts"], l["router"]["k"]) for l in dyn] == [(l["num_experts"], l["router"]["k"]) for l in top]
    assert [l["num_experts"] for l in dyn] == [6, 5, 3, 2]
    assert_unknown_preset_and_variant_refused(config, "full,digits-dyn-nope")


def test_theory_cl_tiny_sweep_end_to_end(tmp_path):
    run = _load("theory_cl", "run")
    summary = run.main(["--preset=tiny", "--variants=M1,M2N-frozen,M2N-never", f"--results={tmp_path / 'results'}"])
    records = {v: json.loads((tmp_path / "results" / f"{v}_seed0.json").read_text())
               for v in ("M1", "M2N-frozen", "M2N-never")}
    frozen, never, single = records["M2N-frozen"], records["M2N-never"], records["M1"]
    assert frozen["seed"] == 0 and frozen["config"]["experts"] == 8 and frozen["config"]["t1"] == 100
    assert frozen["curve"]["round"] == list(range(20, 201, 20))
    # Provenance: the commit of this repository and whether the tree had uncommitted changes.
    assert set(frozen["code"]) >= {"git_commit", "dirty", "repository"} and frozen["code"]["repository"] == str(ROOT.parent)
    # Freezing is the only difference: identical up to T1, then the frozen gate stops while the other moves.
    upto = frozen["curve"]["round"].index(100) + 1
    for key in ("gen_error", "forgetting", "gate_drift"):
        assert frozen["curve"][key][:upto] == never["curve"][key][:upto]
    assert frozen["gate_rounds"] == 100 and never["gate_rounds"] == 200 and single["gate_rounds"] == 0
    assert frozen["metrics"]["gate_drift_after_t1"] == 0.0 < never["metrics"]["gate_drift_after_t1"]
    # Same task stream for every variant of a seed: M=1's routing counts are the cluster counts of the MoE runs.
    assert np.sum(single["routing_counts"], 0).tolist() == np.sum(frozen["routing_counts"], 0).tolist()
    assert sum(frozen["load"]) == 200 and 0.0 <= frozen["metrics"]["purity"] <= 1.0
    cmp = summary["comparisons"]["never - frozen, M=2N"]
    assert cmp["seeds"] == [0] and cmp["gen_error"]["mean"] == pytest.approx(
        never["metrics"]["gen_error"] - frozen["metrics"]["gen_error"], abs=1e-5)
    assert "M=1 - M=2N, frozen" in summary["comparisons"]
    assert (tmp_path / "results" / "curves.png").stat().st_size > 0
    assert "| M2N-never | 1 |" in (tmp_path / "results" / "table.md").read_text()


def test_theory_cl_min_norm_update_interpolates_and_is_minimal():
    cl = _load("theory_cl", "cl_moe")
    rng = np.random.default_rng(0)
    x, w, y = rng.normal(size=(10, 6)), rng.normal(size=10), rng.normal(size=6)
    new = cl.min_norm_update(w, x, y)
    np.testing.assert_allclose(x.T @ new, y, atol=1e-10)  # the task is interpolated exactly
    # It moved within the span of X's columns, so any other interpolator (new + z, X^T z = 0) is farther from w.
    null = np.linalg.svd(x.T)[2][6:]                       # [4, 10] orthonormal basis of X's null space
    np.testing.assert_allclose(null @ (new - w), 0.0, atol=1e-10)
    z = null.T @ rng.normal(size=4)
    assert np.linalg.norm(new - w) < np.linalg.norm(new + z - w)
    np.testing.assert_allclose(cl.min_norm_update(new, x, y), new, atol=1e-12)  # a learnt task moves nothing
    # On a task drawn from the stream: the signal sample pins the expert's coordinate along v_n.
    problem = cl.make_problem(rng, 10, 6, 4, beta=1.0, sigma=0.05)
    x, y, n = cl.sample_task(rng, problem)
    fitted = cl.min_norm_update(np.zeros(10), x, y)
    assert fitted @ problem.signals[n] == pytest.approx(problem.ground_truths[n] @ problem.signals[n])


def test_theory_cl_gate_gradients_match_finite_differences():
    cl = _load("theory_cl", "cl_moe")
    rng = np.random.default_rng(1)
    theta, x = rng.normal(size=(10, 5)), rng.normal(size=(10, 6))
    moved, load, rounds, alpha = np.array([0.0, 0.7, 0.0, 0.0, 0.0]), np.array([.1, .3, .2, .25, .15]), 7, 0.5

    def loss(th):  # L_loc + L_aux as functions of the current gate only (loads and past P terms are constants)
        pi = cl.softmax(cl.gate_logits(th, x))
        return pi @ moved + alpha * 5 * load @ pi / rounds

    pi = cl.softmax(cl.gate_logits(theta, x))
    grad = cl.locality_grad(pi, moved) + cl.balance_grad(pi, load, rounds, alpha)
    stepped = cl.gate_step(theta, x, grad, lr=1.0)
    numeric = np.zeros_like(theta)
    for i in range(theta.shape[0]):
        for j in range(theta.shape[1]):
            e = np.zeros_like(theta)
            e[i, j] = 1e-6
            numeric[i, j] = (loss(theta + e) - loss(theta - e)) / 2e-6
    np.testing.assert_allclose(theta - stepped, numeric, rtol=1e-5, atol=1e-8)
    assert np.array_equal(cl.gate_step(theta, x, np.zeros(5), lr=3.0), theta)


def test_theory_cl_frozen_gate_does_not_change_after_t1():
    cl = _load("theory_cl", "cl_moe")
    base = dict(dim=10, samples=6, clusters=4, experts=8, rounds=300, lr=10.0, noise=3.0, alpha=50.0, beta=1.0,
                sigma=0.05, signal_weight=0.0, reference_t1=100, log_every=10)
    frozen = cl.simulate(cl.SimConfig(freeze_after=100, **base), seed=3)
    never = cl.simulate(cl.SimConfig(freeze_after=None, **base), seed=3)
    rounds = np.asarray(frozen["curve"]["round"])
    drift = np.asarray(frozen["curve"]["gate_drift"])
    assert frozen["gate_rounds"] == 100 and np.all(drift[rounds > 100] == 0.0) and np.all(drift[rounds <= 100] > 0)
    assert np.sum(np.asarray(never["curve"]["gate_drift"])[rounds > 100]) > 0
    # A frozen gate's noise-free routing of each cluster's signal cannot change after T1.
    m = cl.derived_metrics(frozen, 300, 100)
    assert m["gate_drift_after_t1"] == 0.0 and m["consistent_first_after_t1"] is not None
    # The same seed reproduces the run exactly.
    assert cl.simulate(cl.SimConfig(freeze_after=100, **base), seed=3)["curve"] == frozen["curve"]


def test_theory_cl_analysis_helpers_and_configs():
    cl, run, config = (_load("theory_cl", n) for n in ("cl_moe", "run", "config"))
    rounds = [100, 200, 300, 400, 500, 600]
    assert cl.converged_round(rounds, [1.0, 1.0, 0.0, 5.0, 0.0, 0.0], 0.01, 3) == 500
    assert cl.converged_round(rounds, [1.0, 0.0, 0.0, 0.9, 0.0, 0.0], 0.01, 3) == 300  # median ignores one spike
    assert cl.converged_round(rounds, [1.0] * 6, 0.01, 3) is None
    assert (run.later(None, 500), run.later(500, None), run.later(600, 500), run.later(None, None)) == (1, -1, 1, 0)
    assert run.sign_test(3, 3) == pytest.approx(0.125) and run.sign_test(0, 4) == 1.0
    p = run.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert p["mean"] == 2.0 and p["positive"] == 3 and p["ci95"][0] == pytest.approx(2.0 - 4.303 * 1.0 / math.sqrt(3),
                                                                                       rel=1e-3)
    for preset in config.PRESETS:
        for variant in config.PILOT_VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            sim = config.sim_config(cfg)
            assert sim.dim > sim.samples and cfg.t1 % cfg.log_every == 0 and cfg.t1 < cfg.rounds
            assert sim.freeze_after == (cfg.t1 if variant.partition("@")[0].endswith("frozen") else None)
    assert config.parse_variant("M4N-never@aligned") == (16, "never", "aligned")
    assert config.parse_variant("M1") == (1, "none", config.PRIMARY_REGIME)
    for bad in ("M1-frozen", "M2N", "M3N-frozen", "M2N-never@nope"):
        with pytest.raises(ValueError, match="^variant="):
            config.parse_variant(bad)
    assert_unknown_preset_and_variant_refused(config, "tiny,M2N-sometimes")


def test_moqe_tiny_sweep_end_to_end(tmp_path):
    run = _load("moqe", "run")
    config = _load("moqe", "config")
    summary = run.main(["--preset=tiny", "--variants=moe", f"--workdir={tmp_path / 'work'}",
                        f"--results={tmp_path / 'results'}", "--compile_cache="])
    moe = json.loads((tmp_path / "results" / "moe_seed0.json").read_text())
    q = moe["quantization"]
    # The unquantized loss is the trainer's own evaluation on the same batches.
    assert q["loss"] == pytest.approx(moe["final_eval"]["loss"], rel=1e-4)
    assert set(q["sets"]) == {"experts", "dense_ffn", "non_expert", "all"}
    for cells in q["sets"].values():
        assert list(cells) == [str(b) for b in config.BITS]
        errors = [cells[str(b)]["relative_error"] for b in config.BITS]
        assert errors == sorted(errors) and 0 < errors[0] < errors[-1]          # fewer bits, larger error
        assert all(math.isfinite(c["increase"]) for c in cells.values())
    size = config.SIZES["tiny"]
    # Experts: block 1 (moe_every=2) with E experts of [D, F] and [F, D]; its own dense FFN: block 0, [D, 2F] x 2.
    assert q["sets"]["experts"]["8"]["num_params"] == size["experts"] * 2 * size["d"] * size["f"]
    assert q["sets"]["dense_ffn"]["8"]["num_params"] == 2 * size["d"] * 2 * size["f"]
    n = q["sets"]
    assert n["all"]["8"]["num_params"] == n["experts"]["8"]["num_params"] + n["non_expert"]["8"]["num_params"] \
        + size["d"] * size["experts"]                                            # + the router kernel
    assert moe["code"]["moejax_path"] == str(ROOT.parent) and "dirty" in moe["code"]
    pair = summary["comparisons"]["experts_vs_own_dense_ffn_2"]
    assert pair["per_seed"] == [pytest.approx(n["experts"]["2"]["increase"] - n["dense_ffn"]["2"]["increase"])]
    assert summary["verdicts"]["claim2_better_than_dense"]["verdict"] == "not run"     # dense not in --variants
    assert summary["verdicts"]["claim1_secondary_own_dense_ffn"]["verdict"] in (
        "reproduced", "partly", "not reproduced", "not testable here")
    # The dense variants' parameter sets, checked on a freshly initialised model (no training needed).
    dense_cfg = config.get_config("tiny,dense")
    sets = run.selectors(False, config.moe_blocks(dense_cfg.model.num_layers))
    assert set(sets) == {"ffn_moe_blocks", "dense_ffn", "non_ffn", "all"}
    assert sets["ffn_moe_blocks"]("decoder/block_1/ffn/w_in") and not sets["ffn_moe_blocks"]("decoder/block_0/ffn/w_in")
    assert sets["non_ffn"]("decoder/block_0/attn/query/kernel") and not sets["non_ffn"]("decoder/block_0/ffn/w_out")


def test_moqe_configs_are_valid():
    config = _load("moqe", "config")
    for preset in config.PRESETS:
        counts = {}
        for variant in config.VARIANTS:
            cfg = config.get_config(f"{preset},{variant}")
            typed = model_config(cfg.model, vocab_size=256)
            counts[variant] = sum(2 * cfg.model.d_model * (s if isinstance(s, int) else s.num_experts * s.hidden_dim)
                                  for s in typed.ffn_specs())
            moe = cfg.model.moe
            if moe is not None:   # top-2 of width-F experts: the same active width as the dense variant's FFN
                assert moe.router.k * moe.hidden_dim == config.get_config(f"{preset},dense").model.dense_hidden_dim
        assert counts["dense_wide"] == counts["moe"]       # same total FFN parameters (routers aside)
    assert_unknown_preset_and_variant_refused(config, "tiny,nope")


def test_mc_smoe_tiny_sweep_end_to_end(tmp_path):
    run = _load("mc_smoe", "run")
    summary = run.main(["--preset=tiny", f"--workdir={tmp_path / 'work'}", f"--results={tmp_path / 'results'}",
                        "--compile_cache="])
    record = json.loads((tmp_path / "results" / "smoe16_seed0.json").read_text())
    full = record["full"]
    assert full["loss"] == pytest.approx(record["final_eval"]["loss"], rel=1e-4)
    # No fine-tuning in the tiny preset (0 steps): the control's "fine-tuned" loss is the unmerged loss.
    assert full["memory_reduction"] == 0.0 and full["finetuned"] == [full["loss"]]
    row = record["merge"]["2"]
    assert set(row) == {"msmoe", "frequency", "average", "prune"}
    for method, entry in row.items():
        assert math.isfinite(entry["bound"]) and math.isfinite(entry["drop"])
        assert "finetuned" not in entry                # the tiny preset fine-tunes the unmerged control only
        assert sorted(set(entry["assignment"]["decoder/block_0/ffn"])) == [0, 1]
    # Dropping router columns stores less than binding the slots; merged experts halve the expert parameters.
    assert row["prune"]["params"] < row["msmoe"]["params"] < full["params"]
    comp = record["compress"]["2"]["low_rank-2"]
    assert comp["memory_reduction"] > row["msmoe"]["memory_reduction"] and comp["flops_reduction"] > 0
    assert set(summary["verdicts"]) == {"claim1_merging", "claim1_secondary_without_finetuning",
                                        "claim2_compression"}
    assert summary["verdicts"]["claim1_merging"]["verdict"] == "not run"       # no fine-tuned baselines in tiny
    assert summary["verdicts"]["claim1_secondary_without_finetuning"]["verdict"] in (
        "reproduced", "partly", "not reproduced")


def test_mc_smoe_surgery_oracles():
    """Without training: merging into E groups is the identity in both router forms; factorisations at full rank
    reproduce the experts; the bound form of a merge is the drop form when every group has one member; FLOPs by hand."""
    import flax.linen as nn

    mc = _load("mc_smoe", "merge_compress")
    config = _load("mc_smoe", "config")
    cfg = config.get_config("tiny")
    typed = model_config(cfg.model, vocab_size=256)
    model = build_model(typed)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
    variables = dict(nn.unbox(model.init(jax.random.key(0), tokens[:, :-1], deterministic=True)))
    batch = {"tokens": np.asarray(tokens), "mask": np.ones((2, 8), np.float32)}
    e = typed.moe.num_experts
    calib = mc.calibrate(model, variables, [batch], e)
    (path,) = mc.moe_paths(typed)
    assert calib.tokens == 16 and calib.frequency[path].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(calib.similarity[path]), 1.0, rtol=1e-9)
    ref, _ = model.apply(variables, tokens[:, :-1], deterministic=True)
    for method in config.METHODS:
        merged = mc.merge_all(variables["params"], [path], calib, e, method)
        for form in ("bound", "drop"):
            cfg_f, vars_f = mc.merged_variables(typed, variables, merged, form)
            out, _ = build_model(cfg_f).apply(vars_f, tokens[:, :-1], deterministic=True)
            np.testing.assert_allclose(out, ref, atol=1e-5)
    experts = mc.get_in(variables["params"], (*path.split("/"), "experts"))
    d, f = typed.d_model, typed.moe.hidden_dim
    for kind, rank in (("dense", None), ("low_rank", min(d, f)), ("shared_basis", d)):
        p = mc.Parameterised.build(variables["params"], {path: experts}, {path: np.arange(e)}, kind, rank)
        for name, w in p.experts()[path].items():
            np.testing.assert_allclose(w, experts[name], atol=1e-5)
        out, _ = model.apply({"params": p.params()}, tokens[:, :-1], deterministic=True)
        np.testing.assert_allclose(out, ref, atol=1e-4)
    # Fine-tuning a bound merge (2 groups of 4 slots): the router stays frozen, the slots of a group stay one
    # expert, and everything else moves.
    merged = mc.merge_all(variables["params"], [path], calib, 2, "msmoe")
    _, bound = mc.merged_variables(typed, variables, merged, "bound")
    assign = np.asarray(merged.layers[path].assignment)
    param = mc.Parameterised.build(bound["params"], {path: merged.layers[path].experts}, {path: assign})
    settings = dict(steps=3, learning_rate=1e-2, warmup_steps=1, kd_lambda=0.2, kd_temperature=2.0)
    tuned = mc.finetune(model, model, variables, {}, param, lambda i: {"tokens": np.asarray(tokens)}, 0, settings)
    before, after = param.params(), tuned.params()
    layer = lambda p: mc.get_in(p, path.split("/"))      # noqa: E731
    np.testing.assert_array_equal(layer(after)["router"]["kernel"], layer(before)["router"]["kernel"])
    slots = np.asarray(layer(after)["experts"]["w_in"])
    for g in range(2):
        members = np.flatnonzero(assign == g)
        np.testing.assert_array_equal(slots[members], np.broadcast_to(slots[members[0]], slots[members].shape))
    assert not np.allclose(slots, layer(before)["experts"]["w_in"])
    assert not np.allclose(after["embed"]["embedding"], before["embed"]["embedding"])
    low = mc.Parameterised.build(variables["params"], {path: experts}, {path: np.arange(e)}, "low_rank", 2)
    assert low.num_expert_params() == e * 2 * 2 * (d + f)
    assert mc.expert_flops(64, 128, 2, "dense", None) == 2 * 2 * 2 * 64 * 128
    assert mc.expert_flops(64, 128, 2, "low_rank", 16) == 2 * 2 * 2 * 16 * (64 + 128)
    assert mc.flops_per_token(64, 2, 127, 256, 16, 128, 2) == 2 * (8 * 64 * 64 + 4 * 64 * 64 + 2 * 64 * 16
                                                                   + 4 * 2 * 64 * 128) + 2 * 64 * 256


def _moqe_run(variant: str, seed: int, loss: float, increases: dict) -> dict:
    """A synthetic moqe record: ``increases = {set: {bits: increase}}``."""
    sets = {name: {str(b): {"loss": loss + inc, "increase": inc, "relative_error": 0.1 * (9 - b), "num_params": 1}
                   for b, inc in per_bits.items()} for name, per_bits in increases.items()}
    return {"variant": variant, "seed": seed, "bits": [8, 4, 3, 2], "params": {"total": 1, "active": 1},
            "quantization": {"loss": loss, "sets": sets}, "wall_clock_s": 1.0}


@pytest.mark.parametrize("experts,ffn,moe_loss,verdicts", [
    # experts lose a fifth of the dense FFNs' increase; the MoE beats dense even with 2-bit experts
    ({8: 0, 4: 0.002, 3: 0.01, 2: 0.04}, {8: 0, 4: 0.01, 3: 0.05, 2: 0.2}, 1.50, ("reproduced", "reproduced")),
    # experts more robust but not twice as robust; 2-bit experts lose the MoE's advantage, 3-bit ones keep it
    ({8: 0, 4: 0.01, 3: 0.04, 2: 0.15}, {8: 0, 4: 0.01, 3: 0.05, 2: 0.2}, 1.55, ("partly", "partly")),
    # the dense FFNs barely move even at 2 bits; the unquantized MoE is worse than dense
    ({8: 0, 4: 0, 3: 0, 2: 0.001}, {8: 0, 4: 0, 3: 0.001, 2: 0.005}, 1.70, ("not testable here", "not testable here")),
])
def test_moqe_decision_rules(experts, ffn, moe_loss, verdicts):
    run = _load("moqe", "run")
    runs = []
    for seed in range(5):
        jitter = 0.001 * seed        # seed-to-seed spread well below the differences
        runs.append(_moqe_run("moe", seed, moe_loss + jitter, {
            "experts": {b: v + jitter for b, v in experts.items()}, "dense_ffn": ffn,
            "non_expert": ffn, "all": ffn}))
        runs.append(_moqe_run("dense", seed, 1.60 + jitter, {"ffn_moe_blocks": ffn, "dense_ffn": ffn,
                                                              "non_ffn": ffn, "all": ffn}))
    summary = run.summarize(runs)
    assert summary["verdicts"]["claim1_robustness"]["verdict"] == verdicts[0]
    assert summary["verdicts"]["claim2_better_than_dense"]["verdict"] == verdicts[1]
    pair = summary["comparisons"]["experts_vs_dense_ffn_2"]
    assert pair["ci95"][0] <= pair["mean"] <= pair["ci95"][1] and len(pair["per_seed"]) == 5


def _mc_smoe_run(seed: int, ft: dict, compress_ft: float, no_ft: dict | None = None) -> dict:
    """A synthetic mc_smoe record with one G (4): fine-tuned losses ``ft = {method: loss}``, the unmerged control
    2.0 (once and twice fine-tuned), and one compression fine-tuned to ``compress_ft``."""
    no_ft = no_ft or {m: v + 0.1 for m, v in ft.items()}
    merge = {m: {"bound": no_ft[m], "drop": no_ft[m], "primary_form": "drop" if m == "prune" else "bound",
                 "finetuned": ft[m], "memory_reduction": 0.68, "flops_reduction": 0.0} for m in ft}
    return {"seed": seed, "full": {"loss": 2.05, "finetuned": [2.0, 2.0], "params": 1, "flops": 1},
            "calibration": {"frequency": {"l0": [1 / 16] * 16}}, "merge": {"4": merge},
            "compress": {"4": {"low_rank-16": {"loss": 2.5, "finetuned": compress_ft, "memory_reduction": 0.825,
                                               "flops_reduction": 0.307}}},
            "wall_clock_s": 1.0}


@pytest.mark.parametrize("ft,compress_ft,verdicts", [
    ({"msmoe": 2.01, "frequency": 2.03, "average": 2.10, "prune": 2.08}, 2.015, ("reproduced", "reproduced")),
    # averaging beats pruning (so it is not "ineffective"); nothing is within 1% of the control
    ({"msmoe": 2.03, "frequency": 2.04, "average": 2.05, "prune": 2.08}, 2.05, ("partly", "not reproduced")),
    ({"msmoe": 2.06, "frequency": 2.03, "average": 2.05, "prune": 2.08}, 2.05, ("not reproduced", "not reproduced")),
    # pruning 75% of the experts is itself within 1%: the loss threshold cannot discriminate
    ({"msmoe": 2.01, "frequency": 2.03, "average": 2.10, "prune": 2.01}, 2.015, ("reproduced", "not testable here")),
])
def test_mc_smoe_decision_rules(ft, compress_ft, verdicts):
    run = _load("mc_smoe", "run")
    runs = [_mc_smoe_run(seed, {m: v + 0.0005 * seed for m, v in ft.items()}, compress_ft) for seed in range(5)]
    v = run.verdicts(runs)
    assert v["claim1_merging"]["verdict"] == verdicts[0]
    assert v["claim2_compression"]["verdict"] == verdicts[1]
    # Merging that costs nothing before fine-tuning fails claim 1's control.
    free = [_mc_smoe_run(s, ft, compress_ft, no_ft={m: 2.05 for m in ft}) for s in range(5)]
    assert run.verdicts(free)["claim1_merging"]["verdict"] == "not testable here"


def test_mc_smoe_configs_are_valid():
    config = _load("mc_smoe", "config")
    for preset in config.PRESETS:
        cfg = config.get_config(preset)
        typed = model_config(cfg.model, vocab_size=256)
        settings = config.surgery_settings(preset)
        e = typed.moe.num_experts
        assert all(1 <= g < e for g in settings["groups"]) and set(settings["compressions"]) <= set(config.COMPRESSIONS)
        assert all(1 <= r <= min(typed.d_model, typed.moe.hidden_dim) for r in settings["ranks"])
        assert set(settings["finetune_methods"]) <= set(config.METHODS)
    full = config.get_config("full").model
    assert full.moe.num_experts == 16 and full.moe.router.k == 2 and full.moe.dispatch.mode == "dropless"
    assert config.surgery_settings("full")["groups"] == (8, 4)
    with pytest.raises(ValueError, match="^preset="):
        config.surgery_settings("huge")
    assert_unknown_preset_and_variant_refused(config, "tiny,nope")


# Every registered preset of every experiment: run.py refuses it from a tree with uncommitted changes (PROTOCOL.md:
# every result from a recorded commit), before anything is trained or written.
REGISTERED_PRESETS = [("deep_moe", "full"), ("deepseekmoe", "registered"), ("deepseekmoe", "long"),
                      ("deepseekmoe", "full"), ("dynamoe", "registered"), ("dynamoe", "full"), ("mc_smoe", "full"),
                      ("moqe", "full"), ("pmoe", "full"), ("smoe_dropout", "full"), ("smoe_dropout", "overfit"),
                      ("sparse_ot", "full"), ("theory_cl", "full"), ("top_p_routing", "full")]


@pytest.mark.parametrize("experiment,preset", REGISTERED_PRESETS)
def test_registered_presets_refuse_a_dirty_tree(experiment, preset, tmp_path, monkeypatch):
    run = _load(experiment, "run")
    dirty = lambda: {"git_commit": "abc", "dirty": True, "dirty_paths": ["x.py"]}  # noqa: E731
    monkeypatch.setattr(sweep, "code_version", dirty)
    if hasattr(run, "provenance"):      # theory_cl (numpy only) has its own
        monkeypatch.setattr(run, "provenance", dirty)
    monkeypatch.setattr(sweep, "run_all", lambda *a, **k: pytest.fail("ran from a dirty tree"))
    with pytest.raises(SystemExit, match=f"^refusing --preset={preset} from a tree with uncommitted changes"):
        run.main([f"--preset={preset}", f"--results={tmp_path / 'results'}", f"--workdir={tmp_path / 'work'}"])
    assert not list(tmp_path.rglob("*.json"))
