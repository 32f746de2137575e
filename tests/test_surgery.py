"""Expert surgery (moejax.surgery): the foundation (load / rewrite / save), profile, steer, prune, and every tool
run from its command line on a checkpoint of the suite's tiny LM.

Oracles: pruning a never-routed expert changes no output; zero steering offsets change nothing; a forced expert is
used by every token; profile counts equal the routing collection's, co-activation is symmetric with the counts on
its diagonal. End to end: each command writes a new workdir that ``evaluate_at_k`` restores and, for every
checkpoint structure the tools write (steered, fewer experts, upcycled), ``train_and_evaluate`` resumes (2 more
steps); the input workdir stays byte-for-byte the same.

Cost: one 4-step run of a shrunk ``configs/lm_tiny.py`` shared by the module; forwards are jitted with the config
static (one compilation per config, shared with the profiler's); a module-scoped persistent compilation cache lets
the resumed runs of models with the same config as an earlier run (compress, quantize: the trained one; prune,
merge, upcycle: E=4) reuse its executables, so only three configs (trained, E=4, steered) compile a train step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.core import meta

from moejax.config import MoEConfig
from moejax.models.build import build_model, model_config
from moejax.models.config import LMConfig, MLPConfig
from moejax.routing.config import RouterConfig
import moejax.surgery as surgery
from moejax.surgery import io as surgery_io
from moejax.surgery import model as sm
from moejax.surgery import profile as prof_lib
from moejax.surgery import prune as prune_lib
from moejax.surgery import steer as steer_lib
from moejax.surgery.__main__ import main
from moejax.training import loop, train_and_evaluate
from test_training import four_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_DIR = ROOT / "tests" / "fixtures" / "hf" / "qwen2_moe"       # 2 MoE blocks with shared experts and their gate
TEXT = "def main(argv):\n    return sum(int(x) for x in argv) + 42  # the answer\n" * 12


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles(tmp_path_factory):
    """Tiny models: XLA's optimisations cost more compile time than they save; executables persist in a module
    cache directory so that identical train / eval steps of different workdirs compile once. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache
    names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs")
    before = {n: jax.config.values[n] for n in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    """``configs/lm_tiny.py`` shrunk to a 4-step run: 2 blocks, block 0 a dense SwiGLU FFN and block 1 the MoE (8
    experts, top-2), without lm_tiny's shared expert, so that the dense model upcycled below (``every_other``) has
    the pruned models' config: one compilation for both. Multi-layer rewrites and shared experts are covered by the
    Hugging Face fixture and in-memory configs."""
    cfg = four_steps("lm_tiny.py", data_dir)
    cfg.data.update({"seq_len": 16, "batch_size": 4, "eval_batch_size": 4})
    cfg.model.update({"moe_every": 2, "ffn_kind": "glu", "activation": "silu", "use_bias": False,
                      "dense_hidden_dim": 32})
    cfg.model.moe.num_shared_experts = 0
    cfg.mesh.num_devices = 1          # of the suite's 8 CPU devices: one compiles and runs faster here
    cfg.model.d_model = 32
    cfg.model.moe.hidden_dim = 32
    cfg.train.tensorboard = False
    return cfg


def tree_digest(path: pathlib.Path) -> str:
    """One hash of every file's relative path and bytes and every directory's path under ``path``."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    """(the trained workdir, its digest right after training)."""
    path = tmp_path_factory.mktemp("surgery") / "trained"
    train_and_evaluate(tiny_config(data_dir), path)
    return path, tree_digest(path)


@pytest.fixture(scope="module")
def trained(workdir) -> sm.SurgeryModel:
    return surgery.load(workdir[0])


def forward(config, variables, x):
    """(logits, {layer path: (expert_index, weight)}) of the model of ``config``: the profiler's own jitted forward,
    so that tests and tools share its compilations."""
    return prof_lib.forward_with_routing(config, variables, x)


def tokens(n: int = 4, length: int = 16) -> jnp.ndarray:
    ids = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
    return jnp.asarray(ids[: n * length].reshape(n, length))


# ----------------------------------------------------------------------------- oracles

def _mlp_never_routed() -> tuple[sm.SurgeryModel, np.ndarray]:
    """An MLP classifier whose MoE layer input is positive for every example (no norm, a +3 input bias, inputs in
    [0, 1]), and whose router column 2 is -50 everywhere: expert 2 is never chosen."""
    spec = MoEConfig(num_experts=4, hidden_dim=8, expert_kind="glu", activation="silu",
                     router=RouterConfig(k=2, selection_bias=True))
    cfg = MLPConfig(num_classes=3, d_model=8, layers=(spec,), norm=None, residual=False)
    x = np.random.default_rng(0).uniform(size=(16, 5)).astype(np.float32)
    shapes = meta.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), x))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
    params = variables["params"]
    params["input"]["bias"] = jnp.full((8,), 3.0)
    params["layer_0"]["router"]["kernel"] = params["layer_0"]["router"]["kernel"].at[:, 2].set(-50.0)
    return sm.SurgeryModel(cfg, variables), x


def test_pruning_a_never_routed_expert_changes_nothing():
    model, x = _mlp_never_routed()
    logits, routing = forward(model.config, model.variables, x)
    assert not np.any(np.asarray(routing["layer_0"][0]) == 2)
    pruned = prune_lib.drop_experts(model, {0: [2]})
    assert pruned.config.layers[0].num_experts == 3
    new_logits, _ = forward(pruned.config, pruned.variables, x)
    np.testing.assert_allclose(new_logits, logits, rtol=1e-6, atol=1e-6)
    # Every per-expert array followed: experts, kernel columns, selection bias.
    keep = np.array([0, 1, 3])
    old_ffn, new_ffn = model.variables["params"]["layer_0"], pruned.variables["params"]["layer_0"]
    np.testing.assert_array_equal(new_ffn["router"]["kernel"], old_ffn["router"]["kernel"][:, keep])
    np.testing.assert_array_equal(new_ffn["experts"]["w_up"], old_ffn["experts"]["w_up"][keep])
    np.testing.assert_array_equal(pruned.variables["moe_state"]["layer_0"]["router"]["selection_bias"],
                                  model.variables["moe_state"]["layer_0"]["router"]["selection_bias"][keep])
    # Profiled per class label (per example: the MLP routes one token per example): never a copy to expert 2.
    prof = prof_lib.profile_experts(model, prof_lib.array_batches(x, batch_size=16, labels=np.arange(16) % 3))
    lp = prof["layer_0"]
    assert sorted(lp.by_label) == [0, 1, 2] and lp.counts[2] == 0 and lp.counts.sum() == 32
    assert [c.tokens for _, c in sorted(lp.by_label.items())] == [6, 5, 5]
    # The reconstruction criterion removes it first, at zero output error up to float32 rounding: the pruned layer is
    # another compiled program (3 experts, not 4), whose sums may round differently (exactly 0.0 under jax 0.10's XLA,
    # 1e-13 under jax 0.12's). The claim is an unchanged function, so the bound is a relative RMS error of 4 ulps of
    # float32 against the layer's output (the other removals cost ~0.3, twelve orders of magnitude more).
    inputs = prune_lib.layer_inputs(model, [prof_lib.Batch(x)])
    kept, errors = prune_lib.reconstruction_order(model, 0, inputs["layer_0"], 3)
    layer = prune_lib.resolve_layer(model, 0)
    y = prune_lib._layer_output(layer.spec, prune_lib.layer_variables(model, layer), jnp.asarray(inputs["layer_0"]))
    mean_square = float(jnp.mean(jnp.sum(jnp.square(y), axis=-1)))
    assert kept.tolist() == keep.tolist() and len(errors) == 1
    assert 0.0 <= errors[0] <= (4 * np.finfo(np.float32).eps) ** 2 * mean_square, (errors, mean_square)


MOE = "decoder/block_1/ffn"          # the trained LM's one MoE layer (MoE layer 0)


def moe_routing(routing) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(a) for a in routing[MOE])        # expert_index, weight: [B, L, K] each


def test_steering_with_zero_offsets_changes_nothing_and_a_forced_expert_is_always_used(trained):
    x = tokens()
    logits, _ = forward(trained.config, trained.variables, x)
    zero = steer_lib.steer(trained, {0: {3: 0.0}})
    assert zero.config.moe.router.steer and not trained.config.moe.router.steer
    assert set(steer_lib.steering_offsets(zero)) == {MOE}
    steered_logits, _ = forward(zero.config, zero.variables, x)
    np.testing.assert_array_equal(steered_logits, logits)
    forced = steer_lib.steer(zero, {MOE: {5: steer_lib.FORCE, 3: -steer_lib.FORCE}})
    used, weight = moe_routing(forward(forced.config, forced.variables, x)[1])
    assert np.all((used == 5).any(-1)) and not np.any(used == 3)
    np.testing.assert_allclose(weight[used == 5], 1.0, atol=1e-4)     # renormalised: the forced expert dominates
    # A deactivated expert is a never-routed one: pruning it (with its steering entry) changes nothing.
    deact = steer_lib.steer(trained, {0: {3: -steer_lib.FORCE}})
    want, _ = forward(deact.config, deact.variables, x)
    pruned = prune_lib.drop_experts(deact, {0: [3]})
    assert pruned.config.moe.num_experts == 7 and pruned.config.moe.router.steer
    assert steer_lib.steering_offsets(pruned)[MOE].tolist() == [0.0] * 7
    got, _ = forward(pruned.config, pruned.variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_profile_counts_are_the_routing_collections(trained):
    batches = prof_lib.text_batches(list(TEXT.encode()), length=16, max_windows=6, batch_size=4)
    assert len(batches) == 2 and batches[1].mask.tolist() == [1, 1, 0, 0]
    prof = prof_lib.profile_experts(trained, batches, labeler=lambda t: (np.asarray(t) >= 97).astype(int))
    route = prof_lib.routing_fn(trained)
    for ref in sm.moe_layers(trained):
        idx = np.concatenate([route(b.inputs)[ref.path][0][b.mask > 0] for b in batches]).reshape(-1, 2)
        lp = prof[ref.path]
        np.testing.assert_array_equal(lp.counts, np.bincount(idx.ravel(), minlength=8))
        assert lp.tokens == 6 * 16 and np.isclose(lp.frequency.sum(), 1.0) and np.isclose(lp.activation_rate.sum(), 2)
        np.testing.assert_array_equal(lp.coactivation, lp.coactivation.T)
        np.testing.assert_array_equal(np.diag(lp.coactivation), lp.counts)
        np.testing.assert_allclose(np.diag(lp.router_similarity), 1.0, rtol=1e-6)
        assert sum(c.tokens for c in lp.by_label.values()) == lp.tokens
        np.testing.assert_array_equal(sum(c.counts for c in lp.by_label.values()), lp.counts)
        assert np.all((lp.mean_gate > 0) == (lp.counts > 0)) and np.all(lp.mean_gate <= 1)


def test_detect_behaviour_experts_ranks_the_activation_rate_difference(trained, workdir, tmp_path):
    a = np.frombuffer(b"abcdefghijklmnop" * 8, np.uint8).astype(np.int32).reshape(8, 16)
    b = np.frombuffer(b"0123456789 +-*/=" * 8, np.uint8).astype(np.int32).reshape(8, 16)
    found = steer_lib.detect_behaviour_experts(trained, a, b, batch_size=4)
    for path, diff in found.difference.items():
        np.testing.assert_allclose(diff, found.rate_a[path] - found.rate_b[path])
        assert np.isclose(found.rate_a[path].sum(), 2) and np.isclose(found.rate_b[path].sum(), 2)
    assert [d for _, _, d in found.ranked] == sorted((d for _, _, d in found.ranked), reverse=True)
    top = steer_lib.offsets_for(found, 2, -steer_lib.FORCE)
    assert sum(len(v) for v in top.values()) == 2
    path, expert, _ = found.ranked[0]
    assert top[path][expert] == -steer_lib.FORCE
    (tmp_path / "a.txt").write_bytes(a.astype(np.uint8).tobytes())
    (tmp_path / "b.txt").write_bytes(b.astype(np.uint8).tobytes())
    assert cli("detect", f"--model={workdir[0]}", f"--out={tmp_path / 'd'}", f"--text_a={tmp_path / 'a.txt'}",
               f"--text_b={tmp_path / 'b.txt'}", "--length=16", "--batch_size=4") == 0
    written = json.loads((tmp_path / "d" / "detect.json").read_text())
    assert [tuple(r[:2]) for r in written["ranked"]] == [(p, e) for p, e, _ in found.ranked]


def test_config_rewrites_and_their_errors(trained):
    two = dataclasses.replace(trained.config, moe_every=1)            # both blocks MoE, one shared spec
    with pytest.raises(ValueError, match=r"^model\.moe\.num_experts: LMConfig has one MoE spec"):
        sm.config_with_experts(two, {1: 7})
    assert sm.config_with_experts(two, {0: 7, 1: 7}).moe.num_experts == 7
    with pytest.raises(ValueError, match=r"^model\.moe\.num_experts=0: decoder/block_1/ffn would keep no expert"):
        sm.select_experts(trained, {0: []})
    one = sm.select_experts(trained, {0: [4]})          # k=2 clipped to the one expert left
    assert one.config.moe.num_experts == 1 and one.config.moe.router.k == 1
    grouped = dataclasses.replace(trained.config.moe, router=trained.config.moe.router.replace(num_groups=4))
    g = trained.replace(config=dataclasses.replace(trained.config, moe=grouped))
    with pytest.raises(ValueError, match=r"^model\.moe\.router\.num_groups=4: must divide num_experts=6"):
        sm.select_experts(g, {0: range(6)})
    with pytest.raises(ValueError, match=r"^layer=5: not an MoE layer"):
        steer_lib.steer(trained, {5: {0: 1.0}})
    with pytest.raises(ValueError, match=r"^offsets\[decoder/block_1/ffn\]\[1\]=inf: must be a finite number"):
        steer_lib.steer(trained, {0: {1: float("inf")}})
    # Per-layer specs may differ; the config file is rewritten where the config changed, and only there.
    section = {"kind": "mlp", "layers": [{"num_experts": 4}, 16, {"num_experts": 6, "router": {"k": 1}}]}
    mlp = model_config(section, num_classes=2)
    new = sm.config_with_experts(mlp, {0: 2, 2: 5})
    assert [s.num_experts for s in new.layers[::2]] == [2, 5]
    assert surgery_io.model_section(section, mlp, new)["layers"] == [
        {"num_experts": 2}, 16, {"num_experts": 5, "router": {"k": 1}}]


def _random_mlp(*specs) -> sm.SurgeryModel:
    """An MLP classifier with one layer per spec and random variables (traced shapes, no compilation)."""
    cfg = MLPConfig(num_classes=3, d_model=8, layers=specs)
    shapes = meta.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((2, 5))))
    rng = np.random.default_rng(2)
    return sm.SurgeryModel(cfg, jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                                                       shapes))


def test_every_per_expert_array_follows_the_kept_experts():
    # A frozen router (kernel in moe_state) with a selection bias and one MoE++ zero expert (router output 4),
    # and an mlp-kind layer with biases: per-layer specs, so the two layers may end with different E.
    frozen = MoEConfig(num_experts=4, hidden_dim=8, zero_experts=1,
                       router=RouterConfig(k=2, frozen=True, selection_bias=True))
    biased = MoEConfig(num_experts=6, hidden_dim=8, use_bias=True)
    model = _random_mlp(frozen, biased)
    new = sm.select_experts(model, {"layer_0": [3, 1], 1: [0, 2, 5]})
    assert [s.num_experts for s in new.config.layers] == [2, 3] and new.config.layers[0].num_routed == 3
    state = model.variables["moe_state"]["layer_0"]["router"]
    new_state = new.variables["moe_state"]["layer_0"]["router"]
    np.testing.assert_array_equal(new_state["kernel"], np.asarray(state["kernel"])[:, [3, 1, 4]])
    np.testing.assert_array_equal(new_state["selection_bias"], np.asarray(state["selection_bias"])[[3, 1, 4]])
    old1, new1 = sm.layer_experts(model, 1), sm.layer_experts(new, 1)
    assert sorted(new1) == ["b_in", "b_out", "w_in", "w_out"]
    np.testing.assert_array_equal(new1["b_out"], np.asarray(old1["b_out"])[[0, 2, 5]])
    # replace_experts: shapes checked by name; the selection bias must come along when E changes.
    update = sm.LayerUpdate({k: v[:3] for k, v in sm.layer_experts(model, 0).items()},
                            jnp.zeros((8, 4)), None)
    with pytest.raises(ValueError, match=r"^moe_state: layer_0/router/selection_bias has one entry per expert"):
        sm.replace_experts(model, {0: update})
    merged = sm.replace_experts(model, {0: update._replace(selection_bias=jnp.arange(4.0))})
    assert merged.config.layers[0].num_experts == 3
    np.testing.assert_array_equal(merged.variables["moe_state"]["layer_0"]["router"]["kernel"], np.zeros((8, 4)))
    with pytest.raises(ValueError, match=r"^router_kernel\[layer_1\]: shape \(8, 5\), expected \[8, 6\]"):
        sm.replace_experts(model, {1: (sm.layer_experts(model, 1), jnp.zeros((8, 5)))})
    # Routers whose meaning would change: refused by the tools that remap them, naming the field.
    for spec, field in ((MoEConfig(router=RouterConfig(kind="hash", k=1)), "router.kind='hash'"),
                        (MoEConfig(router=RouterConfig(scorer="attention")), "router.scorer='attention'")):
        with pytest.raises(ValueError, match=rf"^model\.layers\[0\]\.{re.escape(field)}: "):
            prune_lib.drop_experts(_random_mlp(spec), {0: [1]})
    with pytest.raises(ValueError, match=r"^model\.layers\[0\]\.router\.kind='hash': has no learned router logits"):
        steer_lib.steer(_random_mlp(MoEConfig(router=RouterConfig(kind="hash", k=1))), {0: {1: 1.0}})


# ----------------------------------------------------------------------------- command line, end to end

def cli(*args: str) -> int:
    return main([str(a) for a in args])


def evaluate(path: pathlib.Path, step: int) -> ml_collections.ConfigDict:
    """``evaluate_at_k`` restores the newest checkpoint of ``path`` (at ``step``) with the trainer's state."""
    cfg = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    evaluation = loop.evaluate_at_k(cfg, path, [None], max_batches=1)[None]
    assert evaluation["step"] == step and np.isfinite(evaluation["loss"])
    return cfg


def resume_and_evaluate(path: pathlib.Path, step: int) -> None:
    """The trainer resumes ``path`` for 2 more steps and the evaluator restores the result."""
    cfg = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    cfg.train.steps = step + 2
    result = train_and_evaluate(cfg, path)
    assert result["step"] == step + 2 and np.isfinite(result["loss"])
    evaluate(path, step + 2)


def test_profile_command(workdir, tmp_path, capsys):
    assert cli("profile", f"--model={workdir[0]}", f"--out={tmp_path / 'p'}", "--max_batches=2", "--by=byte_class") == 0
    summary = json.loads((tmp_path / "p" / "profile.json").read_text())
    layer = summary["layers"][MOE]
    assert layer["tokens"] > 0 and len(layer["coactivation"]) == 8 and set(layer["by_label"]) <= set("01234")
    assert (tmp_path / "p" / "profile.png").stat().st_size > 0
    assert f"{MOE}:" in capsys.readouterr().out


TOOLS = {
    # name: (tool, arguments, experts per layer afterwards, resume). The trainer resumes every checkpoint structure
    # a tool can write: steered (a new transform and moe_state), E=4 (prune; upcycle below). merge writes prune's
    # structure and compress / quantize the trained one, so for them the trainer's restore is checked through
    # evaluate_at_k (the same restore_latest against the trainer's state) to keep the module under its time budget.
    "steer": ("steer", ["--activate=0:2", f"--deactivate={MOE}:5", "--offset=0:1:0.5"], 8, True),
    "prune_frequency": ("prune", ["--keep_top=4", "--max_batches=2"], 4, True),
    "merge": ("merge", ["--groups=4", "--max_batches=2"], 4, False),
    "compress": ("compress", ["--rank=4"], 8, False),
    "quantize": ("quantize", ["--bits=4", "--select=experts_only"], 8, False),
}


@pytest.mark.parametrize("name", list(TOOLS))
def test_tool_command_writes_a_workdir_the_trainer_resumes(name, workdir, tmp_path):
    tool, args, experts, resume = TOOLS[name]
    if tool in ("merge", "compress", "quantize"):
        pytest.importorskip(f"moejax.surgery.{tool}")
    out = tmp_path / "out"
    assert cli(tool, f"--model={workdir[0]}", f"--out={out}", *args) == 0
    new = surgery.load(out)
    assert [r.spec.num_experts for r in sm.moe_layers(new)] == [experts]
    assert json.loads((out / "surgery.json").read_text())["history"][0]["tool"] == tool
    written = {"__file__": str(out / "config.py")}
    exec((out / "config.py").read_text(), written)          # the resume command's --config file
    assert written["get_config"]().to_dict() == json.loads((out / "config.json").read_text())
    if resume:
        resume_and_evaluate(out, step=4)
    else:
        evaluate(out, step=4)
    from moejax.generation.sources import load_language_model
    assert load_language_model(out).config.moe.num_experts == experts


def test_prune_list_command_keeps_exactly_the_other_experts(workdir, trained, tmp_path):
    """``--drop`` lists; the written arrays are the kept experts' (the trainer resumes this E=4 config above)."""
    out = tmp_path / "out"
    assert cli("prune", f"--model={workdir[0]}", f"--out={out}", "--drop=0:0,0:2", "--drop=0:5,0:7") == 0
    new = surgery.load(out)
    assert new.origin.step == 4 and new.config.moe.num_experts == 4
    keep = [1, 3, 4, 6]
    np.testing.assert_array_equal(sm.router_kernel(new, 0), np.asarray(sm.router_kernel(trained, 0))[:, keep])
    for name, w in sm.layer_experts(new, 0).items():
        np.testing.assert_array_equal(w, np.asarray(sm.layer_experts(trained, 0)[name])[keep])
    assert json.loads((out / "surgery.json").read_text())["history"][0]["keep"][MOE] == keep


def test_prune_reconstruct_command(workdir, tmp_path):
    """``--reconstruct=N``: the greedy criterion on the layers' inputs of the workdir's eval tokens."""
    out = tmp_path / "out"
    assert cli("prune", f"--model={workdir[0]}", f"--out={out}", "--reconstruct=7", "--max_batches=1",
               "--max_tokens=32") == 0
    assert surgery.load(out).config.moe.num_experts == 7
    record = json.loads((out / "surgery.json").read_text())["history"][0]
    assert record["how"] == "reconstruction" and all(len(v) == 1 and v[0] >= 0 for v in record["errors"].values())


def _dense_workdir(data_dir: str, path: pathlib.Path) -> pathlib.Path:
    """A dense tiny LM saved as a step-4 workdir by the surgery's own writer (random parameters: no training)."""
    cfg = tiny_config(data_dir)
    cfg.model.moe = None
    cfg.model.moe_every = 1
    experiment = json.loads(json.dumps(cfg.to_dict()))
    config = LMConfig.from_dict({**experiment["model"], "vocab_size": 256})
    shapes = meta.unbox(jax.eval_shape(build_model(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), shapes["params"])
    origin = sm.Origin(sm.WORKDIR, str(path), config, experiment=experiment, step=4,
                       rng=np.asarray(jax.random.key_data(jax.random.key(0))))
    return surgery.save(sm.SurgeryModel(config, {"params": params}, origin), path)


def test_upcycle_command(data_dir, tmp_path):
    pytest.importorskip("moejax.surgery.upcycle")
    dense = _dense_workdir(data_dir, tmp_path / "dense")
    out = tmp_path / "moe"
    assert cli("upcycle", f"--model={dense}", f"--out={out}", "--experts=4", "--k=2", "--noise=0.01",
               "--layers=every_other") == 0
    new = surgery.load(out)
    assert new.config.moe.num_experts == 4 and new.config.moe.router.k == 2
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["num_experts"] == 4
    resume_and_evaluate(out, step=4)


def test_hugging_face_directory_in_and_out(tmp_path):
    from moejax import hf
    src, out = HF_DIR, tmp_path / "pruned"
    assert cli("prune", f"--model={src}", f"--out={out}", "--drop=0:1", "--drop=1:1") == 0
    before, after = hf.load(str(src)), hf.load(str(out))
    ffn = lambda m: m.variables["params"]["decoder"]["block_0"]["ffn"]       # noqa: E731
    keep = [i for i in range(before.config.moe.num_experts) if i != 1]
    e = before.config.moe.num_experts
    assert after.config.moe.num_experts == e - 1
    assert json.loads((out / "config.json").read_text())["num_experts"] == e - 1
    np.testing.assert_array_equal(ffn(after)["shared"]["w_up"], ffn(before)["shared"]["w_up"])
    np.testing.assert_array_equal(ffn(after)["experts"]["w_down"], np.asarray(ffn(before)["experts"]["w_down"])[keep])
    assert (out / "tokenizer.json").is_file()


def test_command_errors_are_one_line(workdir, tmp_path, capsys):
    path = workdir[0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    cases = [
        (["prune", f"--model={path}", f"--out={taken}", "--keep_top=2"], r"^error: out='.*': exists and is not empty"),
        (["prune", f"--model={path}", f"--out={tmp_path / 'a'}", "--keep_top=0"],
         r"^error: --keep_top=0: .*model\.moe\.num_experts"),
        (["prune", f"--model={HF_DIR}", f"--out={tmp_path / 'b'}", "--drop=1:1"],
         r"^error: model\.moe\.num_experts: LMConfig has one MoE spec"),
        (["steer", f"--model={path}", f"--out={tmp_path / 'c'}", "--activate=0:9"],
         r"^error: offsets\[decoder/block_1/ffn\]: expert 9 is not in \[0, 8\)"),
        (["steer", f"--model={tmp_path / 'nowhere'}", f"--out={tmp_path / 'd'}", "--activate=0:1"],
         r"^error: model='.*nowhere': has no config.json"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert re.match(pattern, err), err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_the_input_workdir_is_unchanged(workdir):
    """Last: every command above read this workdir; none may have written to it."""
    path, digest = workdir
    assert tree_digest(path) == digest
