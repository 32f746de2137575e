"""Analytic model FLOPs (moejax.training.flops) against hand counts and XLA's cost analysis; tokens/s, MFU and the
profile window in a short training run (moejax.training.throughput, moejax.training.profiling)."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from moejax.config import DispatchConfig, MoEConfig
from moejax.models.attention import MHA, MLA
from moejax.models.config import LMConfig, MLPConfig, ViTConfig
from moejax.models.transformer import TransformerLM
from moejax.routing.config import RouterConfig
from moejax.routing.scorer import SCORERS
from moejax.training import flops, throughput
from moejax.training.config import train_config, train_settings

# ----------------------------------------------------------------------------- hand counts


def test_attention_counts_projections_and_attended_pairs():
    d, h, length = 64, 4, 10
    proj = 4 * 2 * d * d
    assert flops.attention_flops(d, h, length, causal=False) == proj + 4 * d * length
    assert flops.attention_flops(d, h, length, causal=True) == proj + 4 * d * (length + 1) / 2
    # Grouped-query attention: k and v project to 1 head of 16; a window of 4 keys.
    gqa = 2 * d * d + 2 * 2 * d * 16 + 2 * d * d
    keys = (1 + 2 + 3 + 4 * 7) / 10                                  # positions 0..9 see min(i + 1, 4) keys
    assert flops.attention_flops(d, h, length, causal=True, num_kv_heads=1, window=4) == \
        pytest.approx(gqa + 4 * d * keys)


def test_moe_layer_counts_active_experts_shared_experts_and_router():
    spec = MoEConfig(num_experts=8, hidden_dim=32, expert_kind="glu", num_shared_experts=2, shared_gate=True,
                     router=RouterConfig.from_dict({"k": 2}))
    moe = flops.moe_flops(spec, 16)
    assert moe.experts == 2 * 3 * 2 * 16 * 32 and moe.slots == 2            # k=2 GLU experts, not E=8
    assert moe.shared == 3 * 2 * 16 * 64 + 2 * 16 and moe.router == 2 * 16 * 8
    chain = flops.moe_flops(MoEConfig(num_experts=4, hidden_dim=8, layer="chain", chain_iterations=3), 16)
    assert chain.experts == 3 * 2 * 2 * 2 * 16 * 8 and chain.router == 3 * 2 * 16 * 4
    zc = flops.moe_flops(MoEConfig(num_experts=6, hidden_dim=8, zero_experts=2), 16)
    assert zc.slots == 2 * 6 / 8 and zc.router == 2 * 16 * 8                 # k=2 over 8 router outputs
    with pytest.raises(flops.UnsupportedFlops, match="layer='soft'"):
        flops.moe_flops(MoEConfig(num_experts=4, hidden_dim=8, layer="soft"), 16)


def test_measured_experts_per_token_replace_the_nominal_k():
    # A layer that dropped half of its copies processed k/2 experts per token: half its expert FLOPs go away.
    cfg = MLPConfig(num_classes=10, d_model=16, layers=(MoEConfig(num_experts=4, hidden_dim=8), 32))
    f = flops.mlp_flops(cfg, input_dim=20)
    assert f.experts == (2 * 2 * 2 * 16 * 8, 0.0) and f.expert_slots == (2.0, 0.0)
    assert f.forward() == 2 * 20 * 16 + 2 * 16 * 10 + f.experts[0] + 2 * 16 * 4 + 2 * 2 * 16 * 32
    assert f.forward([1.0, 1.0]) == f.forward() - f.experts[0] / 2            # the dense layer's value is unused
    assert f.training([1.0, 1.0]) == 3 * f.forward([1.0, 1.0])


def test_vit_spreads_patch_projection_and_head_over_its_tokens():
    cfg = ViTConfig(num_classes=10, image_size=8, channels=3, patch_size=4, d_model=32, num_layers=1, num_heads=2)
    f = flops.vit_flops(cfg)
    assert f.tokens_per_example == 5                                          # 4 patches + class token
    assert f.embed_head == pytest.approx((4 * 2 * 48 * 32 + 2 * 32 * 10) / 5)
    assert f.attention == flops.attention_flops(32, 2, 5, causal=False)


# ----------------------------------------------------------------------------- against XLA


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("name", ["linear", "attention"])
@pytest.mark.parametrize("d, e", [(64, 8), (32, 16)])
def test_each_builtin_scorer_states_the_flops_xla_counts(name, d, e):
    scorer = SCORERS.get(name)()
    specs = scorer.params(d, e)
    t = 256
    args = [jax.ShapeDtypeStruct((t, d), jnp.float32)] + [jax.ShapeDtypeStruct(s.shape, jnp.float32)
                                                           for s in specs.values()]
    got = _xla_flops(lambda x, *p: scorer.logits(x, dict(zip(specs, p))), *args)
    assert got == pytest.approx(t * scorer.flops_per_token(d, e), rel=0.01)


ATTENTION = {"mha": MHA(), "gqa": MHA(num_kv_heads=2, head_dim=48),
             "mla": MLA(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)}


@pytest.mark.parametrize("moe, attention", [(False, "mha"), (True, "mha"), (False, "gqa"), (False, "mla")],
                         ids=["dense", "moe_dropless", "gqa", "mla"])
def test_lm_flops_match_xla_cost_analysis(moe, attention):
    # Tolerance 8%: XLA also counts elementwise work (softmax, norms, activations, residuals, the loss), which model
    # FLOPs leave out by convention; at D=128 it is about 6% of the forward. Two systematic differences are
    # accounted for exactly: XLA computes all L x L attention scores and masks them (model FLOPs count the causal
    # half), and on CPU jax.lax.ragged_dot is a dense product over all E experts (E times the routed work; the
    # trainer's CPU default, bulk, runs in while loops whose bodies XLA's cost analysis counts once).
    e, b, length, d = 4, 2, 32, 128
    spec = MoEConfig(num_experts=e, hidden_dim=96, expert_kind="glu", activation="silu", use_bias=False,
                     num_shared_experts=1, dispatch=DispatchConfig(mode="dropless", gmm="ragged_dot")) if moe else None
    cfg = LMConfig(vocab_size=512, d_model=d, num_layers=1, num_heads=4, moe=spec, ffn_kind="glu", use_bias=False,
                   attention=ATTENTION[attention])
    model = TransformerLM(cfg)
    tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)
    variables = dict(jax.eval_shape(model.init, jax.random.key(0), tokens))       # shapes suffice to compile
    params = variables.pop("params")

    def logits(p, t):
        return model.apply({"params": p, **variables}, t)[0]

    analytic = flops.lm_flops(cfg, length)
    att = cfg.attention
    masked = cfg.num_layers * (att.flops(d_model=d, num_heads=4, keys=length)
                               - att.flops(d_model=d, num_heads=4, keys=(length + 1) / 2))
    dense_over_experts = (e - 1) * sum(analytic.experts)
    want_forward = b * length * (analytic.forward() + masked + dense_over_experts)
    got_forward = _xla_flops(logits, params, tokens)
    assert got_forward == pytest.approx(want_forward, rel=0.08)
    got_train = _xla_flops(jax.grad(lambda p, t: jnp.sum(logits(p, t))), params, tokens)
    assert got_train == pytest.approx(3 * want_forward, rel=0.08)


# ----------------------------------------------------------------------------- throughput, MFU, profile


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_mfu_only_where_the_peak_and_the_flops_are_known():
    cfg = LMConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2)
    clock = Clock()
    window = throughput.Window(clock)
    window.add(4, 4 * 8)
    window.add(4, 4 * 8)
    clock.now = 2.0
    on_cpu = throughput.Throughput(cfg, (4, 8), device_kind="cpu", num_devices=1)
    assert on_cpu.tokens_per_example == 8 and "mfu" not in on_cpu.record(window)
    assert on_cpu.record(window)["tokens_per_sec"] == 32.0 and on_cpu.record(window)["examples_per_sec"] == 4.0
    assert "no peak FLOP/s known for device kind 'cpu'" in on_cpu.describe()
    h100 = throughput.Throughput(cfg, (4, 8), device_kind="NVIDIA H100 80GB HBM3", num_devices=8, dtype="bfloat16")
    assert h100.record(window)["mfu"] == pytest.approx(h100.flops.training() * 32.0 / (8 * 989.4e12))
    soft = LMConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                    moe=MoEConfig(num_experts=2, hidden_dim=8, layer="soft"))
    no_count = throughput.Throughput(soft, (4, 8), device_kind="NVIDIA H100 80GB HBM3", num_devices=1)
    assert "mfu" not in no_count.record(window) and "no MFU: MoE layer='soft'" in no_count.describe()


def test_compilation_and_evaluation_are_left_out_of_the_window():
    clock = Clock()
    window = throughput.Window(clock)
    clock.now = 100.0
    window.add(2, 2, compiled=True, seconds=100.0)            # the first step compiled: 100 s
    assert window.counts() == (2, 2, 100.0)                     # alone in its window, it is the window
    with window.paused():
        clock.now = 150.0                                       # evaluation
    clock.now = 160.0
    window.add(3, 3)
    assert window.counts() == (3, 3, 10.0)


@pytest.mark.parametrize("value", [(3,), (2, 2), (-1, 2), (0, 9), "1,2", (1.0, 2)])
def test_profile_steps_errors_name_the_field(value):
    config = {"model": {}, "data": {}, "train": {"steps": 8, "profile_steps": value}}
    with pytest.raises(ValueError, match=r"^train\.profile_steps="):
        train_settings(config)


def test_profile_steps_default_and_a_valid_window():
    assert train_config().profile_steps is None
    assert train_settings({"model": {}, "data": {}, "train": {"steps": 8}})["profile_steps"] is None
    assert train_settings({"model": {}, "data": {}, "train": {"steps": 8, "profile_steps": [2, 8]}}
                          )["profile_steps"] == (2, 8)


def test_training_run_logs_mfu_and_writes_a_profile(tmp_path, data_dir, monkeypatch, capsys):
    # The quickstart's model (tests/test_training.py's tiny MLP config, 4 steps). CPU has no peak in the table, so
    # MFU is omitted there; train.peak_tflops gives it one, so that the MFU path runs end to end.
    from test_training import tiny_mlp
    from moejax.training import train_and_evaluate
    cfg = tiny_mlp(data_dir, steps=4, log_every=2, eval_every=4, checkpoint_every=4, profile_steps=(2, 4),
                   peak_tflops=1.0)
    train_and_evaluate(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "moejax: model FLOPs per token" in out and f"MFU against {jax.device_count()} x 1 TFLOP/s" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(" ex/s  MFU " in line for line in lines)
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all(0 < r["mfu"] < 1 and r["tokens_per_sec"] == r["examples_per_sec"] for r in train)
    model = MLPConfig.from_dict(dict(cfg.model, num_classes=10))
    expected = flops.mlp_flops(model, input_dim=64)                          # digits: 8 x 8 images
    assert train[0]["train_flops_per_token"] == pytest.approx(expected.training(train[0]["experts_per_token"]))
    assert list(pathlib.Path(tmp_path, "profile").rglob("*.xplane.pb"))


@pytest.mark.parametrize("value", [-1.0, 0, "fast", True])
def test_peak_tflops_errors_name_the_field(value):
    with pytest.raises(ValueError, match=r"^train\.peak_tflops="):
        train_settings({"model": {}, "data": {}, "train": {"steps": 8, "peak_tflops": value}})
