"""moejax.hf against the tiny transformers checkpoints in tests/fixtures/hf: logits, routing and greedy generation
equal transformers' own outputs; export re-imports identically with the Hub's tensor names; sharded loading; errors.

Each fixture is loaded once per worker (``_loaded``); every forward pass is jitted once per (family, dispatch).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import moejax.hf as hf
from moejax import parallel
from moejax.config import DispatchConfig
from moejax.generation import decode_fn, for_decoding, generate
from moejax.hf.layout import TensorMap, linear
from moejax.models import TransformerLM, make_cache
from moejax.parallel.mesh import DEFAULT_RULES, MeshConfig, make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
DISPATCH = {"dropless": DispatchConfig(mode="dropless"),
            "capacity": DispatchConfig(mode="capacity", capacity_factor=None, eval_capacity_factor=None)}


def _dir(family: str) -> str:
    return os.path.join(FIXTURES, family)


@functools.lru_cache(maxsize=None)
def _loaded(family: str) -> hf.LoadedModel:
    return hf.load(_dir(family))


@functools.lru_cache(maxsize=None)
def _reference(family: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(_dir(family), "reference.npz")) as ref:
        return {k: ref[k] for k in ref.files}


def _json(family: str, name: str) -> dict:
    with open(os.path.join(_dir(family), name), encoding="utf-8") as f:
        return json.load(f)


def _with_dispatch(cfg, dispatch: DispatchConfig):
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch))


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, variables, tokens):
    """logits float32[B, L, V] and the routing collection (each MoE block's ``expert_index`` [B, L, K])."""
    (logits, _), state = TransformerLM(cfg).apply(variables, tokens, mutable=["routing"])
    return logits, state["routing"]


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _names_shapes(path: str) -> dict[str, dict]:
    """Every tensor of a directory's safetensors -> its shape and dtype."""
    out = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="numpy") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    out[name] = {"shape": list(s.get_shape()), "dtype": s.get_dtype()}
    return out


def _copy(family: str, tmp_path) -> str:
    dst = os.path.join(tmp_path, family)
    shutil.copytree(_dir(family), dst)
    return dst


def _rewrite_tensors(path: str, edit) -> None:
    """Replaces the single-file fixture's tensors by ``edit(dict of numpy tensors)``."""
    fname = os.path.join(path, "model.safetensors")
    with safe_open(fname, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), fname, metadata={"format": "pt"})


def _rewrite_config(path: str, **changes) -> None:
    cfg = {**_json(path, "config.json"), **changes}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)


# ---- parity with transformers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", sorted(DISPATCH))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_routing_equal_transformers(family, dispatch):
    """The three prompts, right-padded into one batch (causal, dropless or unlimited capacity: padding changes
    nothing before it): logits within 1e-4 of transformers', and every MoE layer picks the stored experts."""
    model, ref = _loaded(family), _reference(family)
    logits, routing = _forward(_with_dispatch(model.config, DISPATCH[dispatch]), model.variables,
                               jnp.asarray(ref["prompts"]))
    moe_layers = sorted(int(k.split("_layer")[1]) for k in ref if k.startswith("router_idx_0_"))
    assert moe_layers and sorted(int(b.split("_")[1]) for b in routing["decoder"]) == moe_layers
    for i, n in enumerate(ref["prompt_lengths"]):
        np.testing.assert_allclose(logits[i, :n], ref[f"logits_{i}"], atol=1e-4, rtol=0, err_msg=f"prompt {i}")
        for layer in moe_layers:
            chosen = np.sort(np.asarray(routing["decoder"][f"block_{layer}"]["ffn"]["expert_index"][0][i, :n]), -1)
            np.testing.assert_array_equal(chosen, ref[f"router_idx_{i}_layer{layer}"], err_msg=f"{i} layer {layer}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_equals_transformers(family):
    model, ref = _loaded(family), _reference(family)
    prompts = [ref["prompts"][i, :n].tolist() for i, n in enumerate(ref["prompt_lengths"])]
    out = generate(model.config, model.variables, prompts, max_new_tokens=16)
    for i in range(len(prompts)):
        assert out.tokens[i].tolist() == ref[f"generated_{i}"].tolist(), f"prompt {i}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_transformers_at_every_step(family):
    """Prefill 3 tokens of prompt 0 into a KV cache (MLA: the compressed latent), then feed one token at a time:
    every step's logits equal transformers' full forward pass at that position."""
    model, ref = _loaded(family), _reference(family)
    tokens, n = jnp.asarray(ref["prompts"][:1]), int(ref["prompt_lengths"][0])
    step = jax.jit(decode_fn(for_decoding(model.config), model.variables))
    cache = make_cache(model.config, 1, n)
    logits, cache = step(tokens[:, :3], jnp.arange(3)[None], jnp.ones((1, 3), bool), cache)
    got = [logits[0]]
    for t in range(3, n):
        logits, cache = step(tokens[:, t:t + 1], jnp.full((1, 1), t), jnp.ones((1, 1), bool), cache)
        got.append(logits[0])
    np.testing.assert_allclose(np.concatenate(got), ref["logits_0"], atol=1e-4, rtol=0)


def test_command_line_generation_and_evaluation_on_a_checkpoint_directory(tmp_path):
    """python -m moejax.generate / moejax.lm_eval on a Hugging Face directory: its tokenizer.json encodes the prompt
    (BOS included) and decodes transformers' own greedy continuation; perplexity and expert usage are written."""
    from tokenizers import Tokenizer
    from moejax import generate as generate_cli, lm_eval
    ref, path = _reference("deepseek_v3"), _dir("deepseek_v3")
    text = str(ref["prompt_texts"][0])
    out = generate_cli.run(["--model", path, "--prompt", text, "--max_new_tokens=16", "--stop_token=none"])
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert out == [tok.decode(ref["generated_0"].tolist(), skip_special_tokens=True)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(str(t) for t in ref["prompt_texts"]) * 4)
    summary = lm_eval.run(["--model", path, "--text", str(corpus), "--length=8", "--max_windows=3",
                           "--out", str(tmp_path / "eval")])
    assert summary["tokens"] == 24 and np.isfinite(summary["perplexity"])
    assert sorted(summary["expert_frequency"]) == ["decoder/block_1/ffn", "decoder/block_2/ffn"]
    with np.load(tmp_path / "eval" / "expert_usage.npz") as usage:
        assert usage["decoder/block_1/ffn"].shape == (3, 8, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_load_on_2_data_x_4_expert_mesh_gives_the_same_logits(family):
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    model, ref = hf.load(_dir(family), mesh=mesh), _reference(family)
    experts = [v for k, v in jax.tree_util.tree_leaves_with_path(model.variables["params"])
               if "'experts'" in jax.tree_util.keystr(k)]
    assert experts
    for w in experts:
        assert w.sharding.spec[0] == "expert" and len(w.sharding.device_set) == 8
        assert {s.data.shape[0] for s in w.addressable_shards} == {w.shape[0] // 4}
    rows = [0, 1, 2, 0, 1, 2, 0, 1]                      # 8 sequences: the batch splits over the 8 token shards
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        assert parallel.expert_mesh() is not None         # the MoE layers dispatch expert-parallel
        logits, _ = _forward(model.config, model.variables, jnp.asarray(ref["prompts"][rows]))
    for r, i in enumerate(rows):
        n = ref["prompt_lengths"][i]
        np.testing.assert_allclose(logits[r, :n], ref[f"logits_{i}"], atol=1e-4, rtol=0, err_msg=f"row {r}")


# ---- export ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_export_reimports_identically_with_the_hub_names(family, tmp_path):
    model = _loaded(family)
    out = os.path.join(tmp_path, "export")
    hf.save(out, model.config, model.variables, hf_config=model.hf_config, copy_files_from=model.path)
    want = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in _json(family, "names_shapes.json").items()}
    assert _names_shapes(out) == want
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    again = hf.load(out)
    assert again.config == model.config
    a, b = _leaves(model.variables), _leaves(again.variables)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (again.hf_config.get("bos_token_id"), again.hf_config.get("eos_token_id")) == (0, 1)
    # Without the original config.json: derived from the LMConfig alone, it describes the same model.
    derived = os.path.join(tmp_path, "derived")
    hf.save(derived, model.config, model.variables, model_type=family)
    assert hf.load(derived).config == model.config


def test_export_of_a_modified_model_shards_with_an_index_and_round_trips(tmp_path):
    """An expert zeroed in moejax (expert surgery) survives export -> import; above the size limit the tensors go
    into several files and an index."""
    model = _loaded("qwen3_moe")
    params = jax.tree_util.tree_map(lambda x: x, model.variables["params"])
    w = params["decoder"]["block_1"]["ffn"]["experts"]["w_down"]
    params["decoder"]["block_1"]["ffn"]["experts"]["w_down"] = w.at[5].set(0.0)
    variables = {**model.variables, "params": params}
    files = hf.save(str(tmp_path), model.config, variables, hf_config=model.hf_config, max_shard_bytes=100_000)
    assert len(files) > 1 and os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    again = hf.load(str(tmp_path))
    got = again.variables["params"]["decoder"]["block_1"]["ffn"]["experts"]["w_down"]
    np.testing.assert_array_equal(got, params["decoder"]["block_1"]["ffn"]["experts"]["w_down"])
    assert not np.asarray(got[5]).any()
    with pytest.raises(ValueError, match=r"already holds .*overwrite=True"):
        hf.save(str(tmp_path), model.config, variables, hf_config=model.hf_config)
    assert hf.save(str(tmp_path), model.config, variables, hf_config=model.hf_config, overwrite=True) == \
        ["model.safetensors"]
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_bf16_load_keeps_the_selection_bias_float32_and_exports_bf16(tmp_path):
    model = hf.load(_dir("deepseek_v3"), dtype="bfloat16")
    assert model.config.param_dtype == model.config.moe.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.variables["params"])} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.variables["moe_state"])} == {"float32"}
    hf.save(str(tmp_path), model.config, model.variables, hf_config=model.hf_config)
    dtypes = {k: v["dtype"] for k, v in _names_shapes(str(tmp_path)).items()}
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.1.mlp.experts.0.up_proj.weight"] == "BF16"
    again = hf.load(str(tmp_path))                       # a bf16 checkpoint stays bf16
    assert again.config == model.config
    a, b = _leaves(model.variables), _leaves(again.variables)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("family,to,field", [("olmoe", "mixtral", r"attention\.qk_norm='full'"),
                                             ("qwen2_moe", "qwen3_moe", r"attention\.out_bias=False"),
                                             ("qwen3_moe", "qwen2_moe", r"moe\.num_shared_experts=0"),
                                             ("mixtral", "deepseek_v3", r"attention\.kind='mha'"),
                                             ("deepseek_v3", "qwen3_moe", r"attention\.kind='mla'")])
def test_export_refuses_what_the_family_cannot_express(family, to, field, tmp_path):
    model = _loaded(family)
    with pytest.raises(ValueError, match=rf"^model\.{field}: cannot be exported as model_type='{to}' \(") as e:
        hf.save(str(tmp_path), model.config, model.variables, model_type=to)
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)


def test_export_ignores_training_only_settings_and_names_other_differences():
    # Training-only settings (router jitter, capacity dispatch, dropout) do not stop an export.
    trained = _loaded("mixtral").config
    trained = dataclasses.replace(trained, dropout_rate=0.1, moe=dataclasses.replace(
        trained.moe, router=trained.moe.router.replace(jitter_noise=0.01), dispatch=DispatchConfig(mode="capacity")))
    assert hf.lm_config_from_hf(hf.hf_config_for(trained, "mixtral")) == _loaded("mixtral").config
    cfg = dataclasses.replace(_loaded("qwen3_moe").config, norm="layernorm")
    with pytest.raises(ValueError, match=r"^model\.norm='layernorm': cannot be exported as model_type='qwen3_moe'"):
        hf.hf_config_for(cfg, "qwen3_moe")
    ds = _loaded("deepseek_v3").config
    ds = dataclasses.replace(ds, moe=dataclasses.replace(ds.moe, router=ds.moe.router.replace(group_score="max")))
    with pytest.raises(ValueError, match=r"^model\.moe\.router\.group_score='max': cannot be exported .*'top2_sum'"):
        hf.hf_config_for(ds, "deepseek_v3")


# ---- config.json -------------------------------------------------------------------------------------------------

DEEPSEEK_KEYS = ("scoring_func", "topk_method")          # written for the original DeepSeek code, as on the Hub


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers5_config_form_gives_the_same_model(family):
    five = _json(family, "meta.json")["config_as_written_by_transformers_5"]
    assert "rope_parameters" in five
    cfg = _loaded(family).config
    assert hf.lm_config_from_hf(five) == hf.lm_config_from_hf(_json(family, "config.json")) == cfg
    hub = hf.hf_config_for(cfg, family, five)               # exported from the transformers-5 form: the Hub form
    assert "rope_parameters" not in hub and hub["rope_scaling"] is None
    assert family != "qwen3_moe" or "num_local_experts" not in hub
    assert {k: v for k, v in hub.items() if k not in ("dtype", "transformers_version", *DEEPSEEK_KEYS)} == \
        {k: v for k, v in _json(family, "config.json").items() if k not in ("dtype", "transformers_version")}


UNSUPPORTED = [
    ("mixtral", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, r"rope_scaling=\{'rope_type': 'dynamic'.*\}"),
    ("mixtral", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling=\{'rope_type': 'yarn'.*\}"),
    ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "low_freq_factor": 1}},
     r"rope_parameters=\{'rope_type': 'linear'.*\}"),
    ("olmoe", {"clip_qkv": 8.0}, r"clip_qkv=8\.0"),
    ("qwen2_moe", {"use_sliding_window": True}, r"use_sliding_window=True"),
    ("qwen3_moe", {"quantization_config": {"quant_method": "fp8"}}, r"quantization_config=\{'quant_method': 'fp8'\}"),
    ("deepseek_v3", {"scoring_func": "softmax"}, r"scoring_func='softmax'"),
    ("deepseek_v3", {"topk_method": "greedy"}, r"topk_method='greedy'"),
    ("qwen3_moe", {"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                    "low_freq_factor": 1.0}}, r"rope_scaling=\{'type': 'yarn'.*\}"),
]


@pytest.mark.parametrize("family,change,field", UNSUPPORTED, ids=[f"{f}-{next(iter(c))}" for f, c, _ in UNSUPPORTED])
def test_unsupported_config_values_are_refused_by_name(family, change, field):
    cfg = {**_json(family, "config.json"), **change}
    with pytest.raises(ValueError, match=rf"^config\.json: {field}: not supported \(") as e:
        hf.lm_config_from_hf(cfg)
    assert "\n" not in str(e.value)


ROPE_CASES = ["deepseek_v3_yarn", "qwen3_moe_yarn", "mixtral_linear"]


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_scaling_equals_transformers_and_exports(case):
    """YaRN (with DeepSeek's softmax mscale) and linear scaling: logits of the fixture's weights under a config with
    ``rope_scaling`` equal transformers' (tools/hf_fixtures/make_rope_scaling_fixtures.py), and the exported config
    reads back to the same model."""
    with np.load(os.path.join(FIXTURES, "rope_scaling", f"{case}.npz")) as z:
        family, scaling, want = str(z["family"]), json.loads(str(z["rope_scaling"])), {k: z[k] for k in z.files}
    cfg = hf.lm_config_from_hf({**_json(family, "config.json"), "rope_scaling": scaling})
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == scaling["type"]
    ref = _reference(family)
    for i in (0, 1):
        n = int(ref["prompt_lengths"][i])
        logits, _ = _forward(cfg, _loaded(family).variables, jnp.asarray(ref["prompts"][i][:n][None]))
        np.testing.assert_allclose(logits[0], want[f"logits_{i}"], atol=1e-4, err_msg=f"{case} prompt {i}")
    assert hf.lm_config_from_hf(hf.hf_config_for(cfg, family)) == cfg


def test_unknown_config_keys_and_model_types_are_errors(tmp_path):
    path = _copy("mixtral", tmp_path)
    _rewrite_config(path, router_temperature=0.5)
    with pytest.raises(ValueError, match=r"^config\.json: router_temperature=0\.5: unknown key for "
                                         r"model_type='mixtral'.*does not know"):
        hf.load(path)
    _rewrite_config(path, model_type="llama")
    with pytest.raises(ValueError, match=r"^config\.json: model_type='llama': not supported; supported: \["):
        hf.load(path)
    path = _copy("olmoe", tmp_path)
    _rewrite_config(path, clip_qkv=8.0)
    with pytest.raises(ValueError, match=r"^config\.json: clip_qkv=8\.0: not supported \("):
        hf.load(path)


# ---- tensors -----------------------------------------------------------------------------------------------------

def test_missing_misshaped_and_unused_tensors_are_named(tmp_path):
    path = _copy("mixtral", tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _rewrite_tensors(path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=rf"^{name}: missing from {path}$"):
        hf.load(path)
    shutil.rmtree(path)
    path = _copy("mixtral", tmp_path)
    _rewrite_tensors(path, lambda t: {**t, name: np.ascontiguousarray(t[name].T)})
    with pytest.raises(ValueError, match=rf"^{name}: shape \(32, 24\), expected \(24, 32\)$"):
        hf.load(path)
    shutil.rmtree(path)
    path = _copy("mixtral", tmp_path)
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_tensors(path, lambda t: {**t, extra: np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=rf"^{extra}: in {path} but not part of a mixtral model"):
        hf.load(path)


def test_deepseek_multi_token_prediction_layers_are_skipped(tmp_path, caplog):
    path = _copy("deepseek_v3", tmp_path)
    _rewrite_config(path, num_nextn_predict_layers=1)
    mtp = {"model.layers.3.eh_proj.weight": np.ones((32, 64), np.float32),
           "model.layers.3.enorm.weight": np.ones(32, np.float32)}
    _rewrite_tensors(path, lambda t: {**t, **mtp})
    with caplog.at_level(logging.INFO, logger="moejax"):
        model = hf.load(path)
    assert "skipping 2 tensors" in caplog.text
    a, b = _leaves(model.variables), _leaves(_loaded("deepseek_v3").variables)
    assert all(np.array_equal(a[k], b[k]) for k in b)
    hf.save(os.path.join(tmp_path, "out"), model.config, model.variables, hf_config=model.hf_config)
    assert _json(os.path.join(tmp_path, "out"), "config.json")["num_nextn_predict_layers"] == 0


def test_blocks_are_read_from_only_the_bytes_they_need():
    """TensorMap.read of any block equals the block of the full conversion, and a stacked array's block reads only
    its experts' tensors (what make_array_from_callback asks of each device)."""
    rng = np.random.default_rng(0)
    e, d, h, dh = 4, 6, 3, 2
    tensors = {f"x.{i}.weight": rng.normal(size=(h * dh, d)).astype(np.float32) for i in range(e)}
    m = linear(("params", "w"), "x.{e}.weight", (d,), (h, dh), experts=e)
    full = np.stack([m.to_moejax(tensors[n]) for n in m.hf_names])
    assert full.shape == (e, d, h, dh)
    reads = []

    def read(name, box):
        reads.append(name)
        return tensors[name][box]

    for index in [(slice(1, 3), slice(None), slice(None), slice(None)),
                  (slice(2, 3), slice(1, 5), slice(1, 3), slice(None)),
                  (slice(None), slice(None), slice(None), slice(1, 2))]:      # strided in the HF layout
        reads.clear()
        np.testing.assert_array_equal(m.read(read, index), full[index])
        assert reads == [m.hf.format(e=i) for i in range(*index[0].indices(e))]
    for n, t in m.to_hf(full).items():
        np.testing.assert_array_equal(t, tensors[n])
    out = TensorMap(("params", "o"), "o", (h, dh, d), ((2,), (0, 1)))          # o_proj [D, H*Dh] -> [H, Dh, D]
    o = rng.normal(size=(d, h * dh))
    np.testing.assert_array_equal(out.to_moejax(o)[1], o[:, dh:2 * dh].T)
    np.testing.assert_array_equal(out.to_hf_one(out.to_moejax(o)), o)
