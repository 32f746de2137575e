"""The models: shapes, per-layer routing stats, causality, RoPE, configs, logical axes, and that they train."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moejax import DispatchConfig, MoEConfig, RouterConfig
from moejax.models import (LMConfig, MLPClassifier, MLPConfig, TransformerLM, ViTClassifier, ViTConfig, apply_rope,
                           build_model, count_params, model_config, param_counts)

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

MOE = MoEConfig(num_experts=4, hidden_dim=16, router=RouterConfig(k=2))
LM_CFG = {"kind": "transformer_lm", "d_model": 16, "num_layers": 2, "num_heads": 2, "moe_every": 2,
          "dense_hidden_dim": 32, "moe": {"num_experts": 4, "hidden_dim": 16, "num_shared_experts": 1,
                                          "router": {"k": 2, "jitter_noise": 0.1}}}
VIT_CFG = {"kind": "vit", "d_model": 16, "num_layers": 2, "num_heads": 2, "patch_size": 4, "moe_every": 2,
           "dense_hidden_dim": 32,
           "moe": {"num_experts": 4, "hidden_dim": 16, "expert_kind": "glu", "activation": "silu",
                   "dispatch": {"mode": "capacity", "capacity_factor": 1.5}}}
MLP_CFG = {"kind": "mlp", "d_model": 16,
           "layers": [{"num_experts": 8, "hidden_dim": 16, "router": {"k": 2}}, 32,
                      {"num_experts": 4, "hidden_dim": 16, "router": {"k": 1}}]}


# XLA:CPU compiles threefry slowly (about 1 s per program that draws or folds in a key); the tests only need
# reproducible randomness, not its statistical quality, so they use the cheap-to-compile unsafe_rbg keys.
IMPL = "unsafe_rbg"


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=IMPL)


def tokens(b=2, length=8, vocab=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, length)), jnp.int32)


def images(b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 8, 8, 3)), jnp.float32)


CASES = {  # kind -> (model, input, expected logits shape, expected expert count per FFN layer: 1 = dense)
    "mlp": (lambda: build_model(MLP_CFG, num_classes=5), lambda: images(3), (3, 5), (8, 1, 4)),
    "transformer_lm": (lambda: build_model(LM_CFG, vocab_size=32), lambda: tokens(), (2, 8, 32), (1, 4)),
    "vit": (lambda: build_model(VIT_CFG, num_classes=5, input_shape=(8, 8, 3)), lambda: images(), (2, 5), (1, 4)),
}


@functools.cache
def init(kind):
    """(model, x, boxed variables), initialised once per kind."""
    make_model, make_x, _, _ = CASES[kind]
    model, x = make_model(), make_x()
    return model, x, jax.jit(model.init)(key(1), x)


@functools.cache
def forward(kind):
    """The model's training-mode forward ``f(params, x, seed, **kw) -> (logits, stats)``, compiled once per kind."""
    model = init(kind)[0]

    @jax.jit
    def f(params, x, seed, **kw):
        rngs = {"dropout": jax.random.fold_in(key(0), seed), "jitter": jax.random.fold_in(key(1), seed)}
        return model.apply({"params": params}, x, deterministic=False, rngs=rngs, **kw)
    return f


def run(kind, x=None, seed=0):
    """(logits, stats) of the kind's model on x (default: its init input) in training mode."""
    _, x0, variables = init(kind)
    x = x0 if x is None else x
    kw = {"positions": jnp.arange(x.shape[1])} if kind == "transformer_lm" else {}
    return forward(kind)(nn.unbox(variables)["params"], x, seed, **kw)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_shapes_and_stats_per_ffn_layer(kind):
    model = init(kind)[0]
    logits, stats = run(kind)
    assert logits.shape == CASES[kind][2] and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert isinstance(stats, tuple)
    assert tuple(s.expert_load.shape[0] for s in stats) == CASES[kind][3]
    specs = model.config.ffn_specs()
    assert tuple(s.num_experts if isinstance(s, MoEConfig) else 1 for s in specs) == CASES[kind][3]
    for s, spec in zip(stats, specs):
        if isinstance(spec, MoEConfig):
            np.testing.assert_allclose(float(s.expert_load.sum()), 1.0, rtol=1e-5)
            assert float(s.losses["load_balance"]) > 0


@pytest.mark.parametrize("kind", sorted(CASES))
def test_parameters_carry_logical_axis_names(kind):
    _, _, variables = init(kind)
    leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda p: isinstance(p, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= {None, "embed", "mlp", "heads", "kv", "vocab", "expert"}
    names = {n for leaf in leaves for n in leaf.names}
    assert {"embed", "mlp", "expert"} <= names


def test_lm_is_causal():
    x, t = init("transformer_lm")[1], 5
    base, _ = run("transformer_lm", x)
    moved, _ = run("transformer_lm", x.at[:, t].set((x[:, t] + 1) % 32))
    # Dropless dispatch: a token's routing depends on that token only, so the model is exactly causal
    # (the same seed gives every position the same jitter in both runs).
    np.testing.assert_allclose(base[:, :t], moved[:, :t], atol=1e-6)
    assert np.abs(np.asarray(base[:, t:] - moved[:, t:])).max(axis=-1).min() > 1e-4


@jax.jit
def _rope_score(q, k, m, n):
    return jnp.einsum("blhd,blhd->h", apply_rope(q, m[None]), apply_rope(k, n[None]))


def test_rope_is_a_rotation_and_relative():
    q, k = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 3, 8)), jnp.float32)
    rotated = jax.jit(lambda q: jax.vmap(lambda p: apply_rope(q, p[None]))(jnp.array([0, 3, 11])))(q)
    np.testing.assert_allclose(rotated[0], q, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1),
                               jnp.broadcast_to(jnp.linalg.norm(q, axis=-1), rotated.shape[:-1]), rtol=1e-5)
    for m, n, s in ((4, 1, 7), (0, 6, 3), (9, 9, 20)):
        np.testing.assert_allclose(_rope_score(q, k, jnp.int32(m), jnp.int32(n)),
                                   _rope_score(q, k, jnp.int32(m + s), jnp.int32(n + s)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_rope_score(q, k, jnp.int32(4), jnp.int32(1)), _rope_score(q, k, jnp.int32(1), jnp.int32(4)))


def test_lm_logits_invariant_to_shifting_all_positions():
    model, x, variables = init("transformer_lm")
    f = forward("transformer_lm")
    params = nn.unbox(variables)["params"]
    length = x.shape[1]
    np.testing.assert_allclose(f(params, x, 0, positions=jnp.arange(length))[0],
                               f(params, x, 0, positions=jnp.arange(length) + 13)[0], atol=2e-5)


def test_moe_every_places_moe_blocks():
    cfg = LMConfig(vocab_size=32, d_model=16, num_layers=6, num_heads=2, moe=MOE, moe_every=3, dense_hidden_dim=24)
    assert cfg.ffn_specs() == (24, 24, MOE, 24, 24, MOE)
    assert LMConfig(vocab_size=32, num_layers=3, moe=MOE).ffn_specs() == (MOE,) * 3
    assert LMConfig(vocab_size=32, num_layers=3, moe=None, moe_every=2).ffn_specs() == (512,) * 3
    _, (_, stats) = _shapes(TransformerLM(cfg), tokens())
    assert [s.expert_load.shape[0] for s in stats] == [1, 1, 4, 1, 1, 4]


def test_mlp_per_layer_expert_counts():
    params = nn.unbox(init("mlp")[2])["params"]
    assert params["layer_0"]["experts"]["w_in"].shape == (8, 16, 16)
    assert params["layer_2"]["experts"]["w_in"].shape == (4, 16, 16)
    assert params["layer_0"]["router"]["kernel"].shape == (16, 8)
    assert "experts" not in params["layer_1"] and params["layer_1"]["w_in"].shape == (16, 32)
    _, stats = run("mlp")
    assert float(stats[0].experts_per_token) == pytest.approx(2.0)
    assert float(stats[2].experts_per_token) == pytest.approx(1.0)


def _shapes(model, x):
    """Boxed variable shapes and the (logits, stats) shapes of ``model`` on x, without compiling anything."""
    variables = jax.eval_shape(model.init, key(0), x)
    return variables, jax.eval_shape(lambda v: model.apply(v, x), nn.unbox(variables))


def test_deep_moe_without_residual_or_norm():
    cfg = MLPConfig(num_classes=3, d_model=8, residual=False, norm=None,
                    layers=(MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=1)),) * 3)
    variables, (logits, stats) = _shapes(MLPClassifier(cfg), images(4))
    assert not any("norm" in k for k in variables["params"])
    assert logits.shape == (4, 3) and len(stats) == 3 and all(s.expert_load.shape == (4,) for s in stats)


@pytest.mark.parametrize("cfg", [
    LMConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, norm="rmsnorm", tie_embeddings=False),
    ViTConfig(num_classes=5, image_size=8, channels=3, d_model=16, num_layers=2, num_heads=2, pooling="mean",
              patch_embed="dense"),
], ids=["lm", "vit"])
def test_dense_baseline_has_no_moe_layers(cfg):
    model = TransformerLM(cfg) if isinstance(cfg, LMConfig) else ViTClassifier(cfg)
    x = tokens() if isinstance(cfg, LMConfig) else images()
    variables, (logits, stats) = _shapes(model, x)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    assert not any("experts" in p or "router" in p for p in paths)
    assert len(stats) == 2 and all(s.expert_load.shape == (1,) for s in stats)
    counts = param_counts(model, x)
    assert counts.total == counts.active == count_params(variables["params"]) and counts.routed_experts == 0


def test_param_counts_total_and_active():
    model, x, variables = init("transformer_lm")
    counts = param_counts(model, x)
    params = nn.unbox(variables)["params"]
    assert counts.total == count_params(params) == count_params(variables["params"])
    experts = sum(count_params(b["ffn"]["experts"]) for b in params["decoder"].values()
                  if "ffn" in b and "experts" in b["ffn"])
    assert counts.routed_experts == experts > 0
    assert counts.active == counts.total - experts // 2          # k=2 of E=4 experts per token


def test_vit_conv_and_dense_patch_embedding_agree():
    _, x, variables = init("vit")                                # conv patch embedding
    params = nn.unbox(variables)["params"]
    conv_logits, _ = run("vit")
    dense = ViTClassifier(ViTConfig.from_dict({**VIT_CFG, "num_classes": 5, "image_size": [8, 8],
                                               "patch_embed": "dense"}))
    dense_params = {**params, "patch_embed": {"kernel": params["patch_embed"]["kernel"].reshape(-1, 16),
                                              "bias": params["patch_embed"]["bias"]}}
    dense_logits, _ = jax.jit(lambda p: dense.apply({"params": p}, x, deterministic=False))(dense_params)
    np.testing.assert_allclose(conv_logits, dense_logits, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_few_adam_steps_reduce_the_loss(kind):
    model, x, variables = init(kind)
    lm = kind == "transformer_lm"
    x = tokens(4, 12) if lm else jnp.concatenate([x, x + 0.5])
    y = None if lm else jnp.arange(x.shape[0]) % 5
    opt = optax.adam(1e-2)

    def loss(params, rng):
        logits, stats = model.apply({"params": params}, x, deterministic=False,
                                    rngs={"dropout": rng, "jitter": jax.random.fold_in(rng, 1)})
        logits, labels = (logits[:, :-1], x[:, 1:]) if lm else (logits, y)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + sum(s.losses.get("load_balance", 0.0) for s in stats), ce     # weight 0.01, the default

    @jax.jit
    def steps(params, rng):
        def step(carry, rng):
            params, state = carry
            (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(params, rng)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), ce
        params = nn.unbox(params)
        return jax.lax.scan(step, (params, opt.init(params)), jax.random.split(rng, 12))[1]

    losses = np.asarray(steps(variables["params"], key(3)))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses


CONFIG_ERRORS = [
    (lambda: LMConfig(vocab_size=32, d_model=64, num_heads=3), "model.num_heads=3: must divide model.d_model=64"),
    (lambda: LMConfig(vocab_size=32, d_model=12, num_heads=4), "model.num_heads=4: rotary"),
    (lambda: LMConfig(vocab_size=0), "model.vocab_size=0"),
    (lambda: LMConfig(vocab_size=32, num_layers=0), "model.num_layers=0"),
    (lambda: LMConfig(vocab_size=32, moe=MOE, moe_every=0), "model.moe_every=0"),
    (lambda: LMConfig(vocab_size=32, num_layers=2, moe=MOE, moe_every=3), "model.moe_every=3"),
    (lambda: LMConfig(vocab_size=32, norm="batchnorm"), "model.norm='batchnorm'"),
    (lambda: LMConfig(vocab_size=32, rope_base=0.5), "model.rope_base=0.5"),
    (lambda: LMConfig(vocab_size=32, dense_hidden_dim=0), "model.dense_hidden_dim=0"),
    (lambda: LMConfig(vocab_size=32, dropout_rate=1.0), "model.dropout_rate=1.0"),
    (lambda: MLPConfig(num_classes=3, layers=()), "model.layers=()"),
    (lambda: MLPConfig(num_classes=3, layers=(MOE, 0)), "model.layers[1]=0"),
    (lambda: MLPConfig(num_classes=0), "model.num_classes=0"),
    (lambda: MLPConfig(num_classes=3, ffn_kind="conv"), "model.ffn_kind='conv'"),
    (lambda: ViTConfig(num_classes=3, image_size=(28, 28), patch_size=5), "model.patch_size=5: must divide"),
    (lambda: ViTConfig(num_classes=3, image_size=(28, 0)), "model.image_size[1]=0"),
    (lambda: ViTConfig(num_classes=3, image_size=8, pooling="max"), "model.pooling='max'"),
    (lambda: ViTConfig(num_classes=3, image_size=8, patch_embed="linear"), "model.patch_embed='linear'"),
    (lambda: MLPConfig.from_dict({"num_classes": 3, "layers": [{"num_experts": 0}]}),
     "model.layers[0].num_experts=0"),
    (lambda: LMConfig.from_dict({"vocab_size": 32, "moe": {"num_experts": 4, "router": {"k": 5}}}),
     "model.moe.router.k=5"),
    (lambda: LMConfig.from_dict({"vocab_size": 32, "num_head": 4}), "model.num_head: unknown field of LMConfig"),
    (lambda: LMConfig.from_dict({"vocab_size": 32, "moe": {"topk": 2}}), "model.moe.topk: unknown field"),
    (lambda: ViTConfig.from_dict({"num_classes": 3, "image_size": 8, "moe": {"router": {"kk": 1}}}),
     "model.moe.router.kk: unknown field"),
    (lambda: MLPConfig.from_dict({"num_classes": 3, "layers": [{"hidden": 4}]}), "model.layers[0].hidden: unknown"),
    (lambda: LMConfig.from_dict({"d_model": 32}), "model.vocab_size: required"),
    (lambda: LMConfig.from_dict({"kind": "vit", "vocab_size": 32}), "model.kind='vit'"),
    (lambda: build_model({"kind": "rnn"}), "model.kind='rnn'"),
    (lambda: build_model({**MLP_CFG, "num_classes": 10}, num_classes=5), "model.num_classes=10: must be equal to"),
    (lambda: build_model({**LM_CFG, "vocab_size": 16}, vocab_size=32), "model.vocab_size=16: must be >="),
    (lambda: build_model({**VIT_CFG, "num_classes": 5, "image_size": 16}, input_shape=(8, 8, 3)),
     "model.image_size=(16, 16)"),
]


@pytest.mark.parametrize("make, message", CONFIG_ERRORS, ids=[m.split(":")[0] for _, m in CONFIG_ERRORS])
def test_config_errors_name_their_field(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(message), str(e.value)


def test_build_model_from_config_dict_and_data_sizes():
    lm = build_model(ml_collections.ConfigDict(LM_CFG), vocab_size=32)
    assert isinstance(lm, TransformerLM) and lm.config.vocab_size == 32
    assert lm.config.moe == MoEConfig.from_dict(LM_CFG["moe"])
    assert build_model({**LM_CFG, "vocab_size": 64}, vocab_size=50).config.vocab_size == 64   # padded vocabulary
    vit = build_model(ml_collections.ConfigDict(VIT_CFG), num_classes=10, input_shape=(8, 8, 1))
    assert isinstance(vit, ViTClassifier) and (vit.config.image_size, vit.config.channels) == ((8, 8), 1)
    assert vit.config.moe.dispatch == DispatchConfig(mode="capacity", capacity_factor=1.5)
    mlp = build_model(ml_collections.ConfigDict(MLP_CFG), num_classes=10, vocab_size=99, input_shape=(4, 4))
    assert isinstance(mlp, MLPClassifier) and [type(s) for s in mlp.config.layers] == [MoEConfig, int, MoEConfig]
    assert model_config(mlp.config, num_classes=10) == mlp.config


# --------------------------------------------------------------------------------- active parameters per layer kind
# One MoE layer in an MLP classifier (D = 4, a batch of T = 8 examples = 8 routed tokens). A routed expert ``mlp``
# of width 3 with biases has P = 4*3 + 3 + 3*4 + 4 = 31 parameters; a constant expert has v [4] + W_c [4, 2] = 12.
# Each case: MoEConfig fields, the routed parameters NOT applied to a token at most (total - active_max) and on
# average (total - active_mean; None: the average depends on the data).
P = 31
ACTIVE_CASES = {
    "topk_k2": (dict(router=RouterConfig(k=2)), 2 * P, 2 * P),
    "topk_k1_shared_gated": (dict(router=RouterConfig(k=1), num_shared_experts=1, shared_gate=True), 3 * P, 3 * P),
    "hash_k1": (dict(router=RouterConfig(kind="hash", k=1)), 3 * P, 3 * P),
    "top_p_k3": (dict(router=RouterConfig(kind="top_p", k=3, top_p=0.5)), P, None),       # k is the maximum
    "top_p_k1": (dict(router=RouterConfig(kind="top_p", k=1, top_p=0.5)), 3 * P, 3 * P),
    "threshold_k2": (dict(router=RouterConfig(kind="threshold", k=2, threshold=0.3)), 2 * P, None),
    # C = ceil(1.5 * 8 * 1 / 4) = 3 tokens per expert: 3 * 4 / 8 = 1.5 experts per token on average.
    "expert_choice": (dict(router=RouterConfig(kind="expert_choice", k=1),
                           dispatch=DispatchConfig(mode="capacity", capacity_factor=1.5)), 0, 2.5 * P),
    "soft": (dict(layer="soft", soft_slots=2), 0, 0),
    "smear": (dict(layer="smear"), 0, 0),
    "chain_i2_k1": (dict(layer="chain", chain_iterations=2, router=RouterConfig(k=1)), 2 * P, None),
    "chain_i3_k2": (dict(layer="chain", chain_iterations=3, router=RouterConfig(k=2)), 0, None),   # min(6, 4) = 4
    "chain_i2_k4": (dict(layer="chain", chain_iterations=2, router=RouterConfig(k=4)), 0, 0),
    # 4 FFN + 1 zero + 1 copy + 2 constant outputs, k = 2: at most 2 FFN experts; all constant parameters idle.
    "moe_plus_plus": (dict(zero_experts=1, copy_experts=1, constant_experts=2, router=RouterConfig(k=2)),
                      2 * P + 2 * 12, None),
}


def _mlp_counts(fields: dict, *, train: bool = True):
    spec = MoEConfig(**{"num_experts": 4, "hidden_dim": 3, "activation": "relu", **fields})
    model = MLPClassifier(MLPConfig(num_classes=3, d_model=4, layers=(spec,)))
    x = jax.ShapeDtypeStruct((8, 5), jnp.float32)
    return param_counts(model, x, train=train), count_params(jax.eval_shape(model.init, key(0), x)["params"])


@pytest.mark.parametrize("name", sorted(ACTIVE_CASES))
def test_active_params_hand_computed_per_layer_kind(name):
    fields, idle_max, idle_mean = ACTIVE_CASES[name]
    counts, total = _mlp_counts(fields)
    assert counts.total == total and counts.routed_experts == 4 * P
    assert counts.total - counts.active_max == idle_max and counts.active == counts.active_max
    if idle_mean is None:
        assert counts.active_mean is None
    else:
        assert counts.total - counts.active_mean == pytest.approx(idle_mean, abs=1e-9)


def test_active_params_expert_choice_eval_capacity_and_routed_tokens_per_model():
    # Evaluation capacity factor 2.0: C = ceil(2 * 8 / 4) = 4, so 2 experts per token on average.
    counts, _ = _mlp_counts(ACTIVE_CASES["expert_choice"][0], train=False)
    assert counts.total - counts.active_mean == pytest.approx(2 * P)
    # LM: T = B * L = 16 tokens, C = ceil(1.25 * 16 / 4) = 5, 5 * 4 / 16 = 1.25 experts per token; one MoE block;
    # experts mlp D=16, F=16 with biases: 16*16*2 + 16 + 16 = 544.
    lm = build_model({**LM_CFG, "moe": {"num_experts": 4, "hidden_dim": 16, "router": {"kind": "expert_choice",
                                                                                         "k": 1}}}, vocab_size=32)
    counts = param_counts(lm, jax.ShapeDtypeStruct((2, 8), jnp.int32))
    assert counts.total - counts.active_mean == pytest.approx((4 - 1.25) * 544) and counts.active_max == counts.total
    # ViT: T = B * (N + 1) = 2 * (4 patches + class token) = 10, C = ceil(1.5 * 10 / 4) = 4: 1.6 experts per token;
    # GLU experts with biases: 3 * 16 * 16 + 16 + 16 + 16 = 816.
    vit = build_model({**VIT_CFG, "moe": {**VIT_CFG["moe"], "router": {"kind": "expert_choice", "k": 1}}},
                      num_classes=5, input_shape=(8, 8, 3))
    counts = param_counts(vit, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    assert counts.total - counts.active_mean == pytest.approx((4 - 1.6) * 816)


def test_active_params_when_constant_experts_are_dearer_than_ffn_experts():
    # P = 4*1 + 1*4 = 8 (width 1, no biases) < 12 per constant expert; 2 FFN + 2 constant outputs, k = 3: the
    # dearest choice is 1 FFN + 2 constant experts = 32 of the 2*8 + 2*12 = 40 routed parameters.
    counts, _ = _mlp_counts(dict(num_experts=2, hidden_dim=1, use_bias=False, constant_experts=2,
                                 router=RouterConfig(k=3)))
    assert counts.routed_experts == 16 and counts.total - counts.active_max == 8 and counts.active_mean is None
    model = MLPClassifier(MLPConfig(num_classes=3, d_model=4, layers=(
        MoEConfig(num_experts=2, hidden_dim=1, use_bias=False, constant_experts=2, router=RouterConfig(k=3)),)))
    params = jax.eval_shape(model.init, key(0), jnp.zeros((8, 5)))["params"]
    assert count_params(params["layer_0"]["zero_computation"]) == 2 * 12
