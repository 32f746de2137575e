"""KV-cache decoding equals full recomputation; batched generation; sampling filters; attention kinds' configs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import DispatchConfig, MoEConfig
from moejax.routing.config import RouterConfig
from moejax.generation import Sampling, SelfContrast, decode_fn, filter_logits, for_decoding, generate, next_token
from moejax.generation.evaluate import evaluate_lm, windows
from moejax.models import MHA, MLA, LMConfig, TransformerLM, ViTConfig, make_cache
from moejax.models.config import TransformerConfig

MOE = MoEConfig(num_experts=4, hidden_dim=16, expert_kind="glu", activation="silu", use_bias=False,
                dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0))
ATTENTIONS = {
    "mha": MHA(),
    "gqa_qknorm_bias_window": MHA(num_kv_heads=2, head_dim=6, qkv_bias=True, qk_norm="head", sliding_window=3),
    "mqa_full_qknorm": MHA(num_kv_heads=1, qk_norm="full"),
    "mla": MLA(q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5),
}


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


def _model(attention, moe=MOE):
    cfg = LMConfig(vocab_size=40, d_model=16, num_heads=4, num_layers=2, attention=attention, moe=moe,
                   norm="rmsnorm", dense_layers=(0,))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 40)
    return cfg, jax.jit(TransformerLM(cfg).init)(jax.random.PRNGKey(0), tokens), tokens


def _is_greedy_continuation(cfg, variables, prompt, new):
    """The full forward pass over prompt + new tokens picks each new token as its argmax (greedy recomputation)."""
    logits, _ = jax.jit(TransformerLM(for_decoding(cfg)).apply)(variables, jnp.asarray([list(prompt) + list(new)]))
    return np.argmax(logits[0, len(prompt) - 1:-1], axis=-1).tolist() == list(new)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_cached_decoding_equals_full_recomputation(name):
    """Prefill 4 tokens, then one at a time: every step's logits equal the full forward pass's at that position,
    and batched, left-padded greedy generation equals greedy decoding by recomputation, prompt by prompt."""
    cfg, variables, tokens = _model(ATTENTIONS[name])
    full, _ = jax.jit(TransformerLM(for_decoding(cfg)).apply)(variables, tokens)
    step = jax.jit(decode_fn(for_decoding(cfg), variables))
    cache = make_cache(cfg, 2, 12)
    logits, cache = step(tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)), jnp.ones((2, 4), bool), cache)
    np.testing.assert_allclose(logits, full[:, :4], atol=2e-5)
    for t in range(4, 9):
        logits, cache = step(tokens[:, t:t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), bool), cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5, err_msg=f"step {t}")
    assert int(cache.index) == 9 and bool(cache.valid[:, :9].all()) and not bool(cache.valid[:, 9:].any())
    if name not in ("gqa_qknorm_bias_window", "mla"):      # left padding x (window, latent cache) suffices
        return
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    out = generate(cfg, variables, prompts, max_new_tokens=5)
    assert all(_is_greedy_continuation(cfg, variables, p, new) for p, new in zip(prompts, out.as_lists()))


def test_stop_token_pads_the_rest_and_sets_lengths():
    cfg, variables, _ = _model(ATTENTIONS["mha"], moe=None)
    free = generate(cfg, variables, [[1, 2, 3], [7]], max_new_tokens=6)
    stop = int(free.tokens[0, 2])
    out = generate(cfg, variables, [[1, 2, 3], [7]], max_new_tokens=6, stop_token=stop, pad_id=0)
    first = int(np.argmax(free.tokens[0] == stop))
    assert out.lengths[0] == first + 1
    assert out.tokens[0, :first + 1].tolist() == free.tokens[0, :first + 1].tolist()
    assert (out.tokens[0, first + 1:] == 0).all()


def test_sampling_filters_and_frequencies():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # top-p: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> the first two only; 0.95 needs three
    assert np.isfinite(filter_logits(logits, None, 0.7)).tolist() == [[True, True, False, False]]
    assert np.isfinite(filter_logits(logits, None, 0.95)).tolist() == [[True, True, True, False]]
    assert np.isfinite(filter_logits(logits, None, 0.4)).tolist() == [[True, False, False, False]]
    many = jnp.repeat(logits, 4000, axis=0)
    draws = next_token(many, jax.random.PRNGKey(0), Sampling(temperature=1.0, top_k=3))
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)
    assert next_token(logits, None, Sampling()).tolist() == [0]


def test_sampled_generation_is_reproducible_and_in_vocabulary():
    cfg, variables, _ = _model(ATTENTIONS["mha"], moe=None)
    kw = dict(max_new_tokens=4, sampling=Sampling(temperature=0.8, top_k=10, top_p=0.9))
    a = generate(cfg, variables, [[1, 2], [3]], rng=jax.random.PRNGKey(3), **kw)
    b = generate(cfg, variables, [[1, 2], [3]], rng=jax.random.PRNGKey(3), **kw)
    assert a.as_lists() == b.as_lists() and ((a.tokens >= 0) & (a.tokens < 40)).all()


@pytest.mark.parametrize("make, match", [
    (lambda v: generate(*v, [[1], []], max_new_tokens=2), r"^prompts\[1\]: empty prompt"),
    (lambda v: generate(*v, [[1, 99]], max_new_tokens=2), r"^prompts\[0\]: token id 99 outside the vocabulary"),
    (lambda v: generate(*v, [[1]], max_new_tokens=0), r"^max_new_tokens=0: must be an integer >= 1"),
    (lambda v: generate(*v, [[1]], max_new_tokens=2, sampling=Sampling(temperature=1.0)), r"^rng: sampling"),
    (lambda v: Sampling(temperature=-1), r"^sampling\.temperature=-1"),
    (lambda v: Sampling(top_p=0.0), r"^sampling\.top_p=0\.0"),
])
def test_generation_errors(make, match):
    cfg, variables, _ = _model(ATTENTIONS["mha"], moe=None)
    with pytest.raises(ValueError, match=match):
        make((cfg, variables))


@pytest.mark.parametrize("moe, match", [
    (MoEConfig(num_experts=4, hidden_dim=8, layer="soft"), r"^model\.moe\.layer='soft': mixes the tokens"),
    (MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(kind="expert_choice"),
               dispatch=DispatchConfig(mode="capacity")),
     r"^model\.moe\.router\.kind='expert_choice': experts choose"),
])
def test_decoding_refuses_layers_that_mix_tokens(moe, match):
    with pytest.raises(ValueError, match=match):
        for_decoding(LMConfig(vocab_size=8, d_model=8, num_heads=2, moe=moe))


@pytest.mark.parametrize("make, match", [
    (lambda: LMConfig(vocab_size=8, d_model=16, num_heads=4, attention=MHA(num_kv_heads=3)),
     r"^model\.attention\.num_kv_heads=3: must divide model\.num_heads=4"),
    (lambda: LMConfig.from_dict({"vocab_size": 8, "attention": {"kind": "mha", "num_kv_head": 2}}),
     r"^model\.attention\.num_kv_head: unknown field of attention kind 'mha' \(did you mean 'num_kv_heads'"),
    (lambda: LMConfig.from_dict({"vocab_size": 8, "attention": {"kind": "latent"}}),
     r"^model\.attention\.kind='latent': unknown attention kind"),
    (lambda: MHA(qk_norm="layer"), r"^attention\.qk_norm='layer': must be one of"),
    (lambda: ViTConfig(num_classes=2, image_size=8, attention=MLA()), r"^model\.attention\.kind='mla': .*rotary"),
    (lambda: LMConfig(vocab_size=8, num_layers=2, dense_layers=(2,)), r"^model\.dense_layers=\(2,\): must be"),
    (lambda: LMConfig(vocab_size=8, norm_eps=0.0), r"^model\.norm_eps=0\.0: must be a number in \(0, 1\)"),
])
def test_attention_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_attention_from_dict_and_dense_layers():
    cfg = LMConfig.from_dict({"vocab_size": 8, "num_layers": 3, "moe": {"num_experts": 2, "router": {"k": 1}},
                              "dense_layers": [0], "attention": {"kind": "mla", "kv_lora_rank": 4}})
    assert isinstance(cfg.attention, MLA) and cfg.attention.kv_lora_rank == 4
    assert [isinstance(s, MoEConfig) for s in cfg.ffn_specs()] == [False, True, True]
    assert isinstance(TransformerConfig().attention, MHA)


def test_evaluate_lm_matches_the_forward_pass_and_records_every_token():
    """Perplexity equals the mean cross-entropy of one direct forward pass; every token's K experts are recorded
    and the frequencies count them."""
    cfg, variables, _ = _model(ATTENTIONS["mha"], moe=MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2)))
    w = windows(list(range(40)) * 3, 9, max_windows=5)                       # 120 tokens -> 12 windows, keep 5
    assert w.shape == (5, 10)
    result = evaluate_lm(cfg, variables, w, batch_size=2)
    logits, _ = jax.jit(TransformerLM(cfg).apply)(variables, jnp.asarray(w[:, :-1]))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), w[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(result.nll, nll, rtol=1e-5)
    assert list(result.expert_index) == ["decoder/block_1/ffn"]              # block 0 is dense
    idx = result.expert_index["decoder/block_1/ffn"]
    assert idx.shape == (5, 9, 2) and ((idx >= 0) & (idx < 4)).all()
    np.testing.assert_allclose(result.expert_frequency["decoder/block_1/ffn"],
                               np.bincount(idx.ravel(), minlength=4) / idx.size, atol=1e-6)
    with pytest.raises(ValueError, match=r"^length=50: the text has 20 tokens"):
        windows(list(range(20)), 50)


def test_self_contrast_scores_and_decoding():
    """SCMoE's score by hand; beta=0, or a weak activation equal to the strong one, is plain greedy decoding; a
    weak top-1 activation changes the contrast scores and only plausible tokens can be chosen."""
    strong, weak = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]])), jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]]))
    scores = SelfContrast(beta=1.0, alpha=0.1).combine(strong, weak)
    np.testing.assert_allclose(scores[0, :2], [2 * np.log(0.6) - np.log(0.7), 2 * np.log(0.3) - np.log(0.1)],
                               rtol=1e-5)
    assert np.isneginf(scores[0, 2:]).all()                                   # 0.05 < 0.1 * 0.6: implausible
    assert int(jnp.argmax(scores)) == 1                                       # the strong activation's addition
    cfg, variables, _ = _model(ATTENTIONS["mha"], moe=MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2)))
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate(cfg, variables, prompts, max_new_tokens=4).as_lists()
    assert generate(cfg, variables, prompts, max_new_tokens=4, contrast=SelfContrast(beta=0.0)).as_lists() == plain
    assert generate(cfg, variables, prompts, max_new_tokens=4,
                    contrast=SelfContrast(weak_k=2, beta=0.7)).as_lists() == plain
    with pytest.raises(ValueError, match=r"^contrast\.weak_k=0"):
        SelfContrast(weak_k=0)
