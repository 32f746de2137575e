"""Upcycling a dense LM into an MoE (moejax.surgery.upcycle): the oracle is the dense model itself.

Copy mode with identical experts and renormalised weights, and partition mode with every expert active at weight 1,
must reproduce the dense model's logits at initialisation. Models are tiny (2 blocks, D=16, F=32) and each dense
model is built once; every distinct config costs one jit compilation, so the cases are chosen to cover the
grid (glu/mlp with biases, all/every_other blocks, k=1/k=2) without compiling every combination.
"""
from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from moejax.config import MoEConfig
from moejax.models.config import LMConfig
from moejax.models.transformer import TransformerLM
from moejax.routing.config import RouterConfig
from moejax.surgery.upcycle import layer_pattern, upcycle

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

VOCAB, D, F, E = 32, 16, 32, 4
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, VOCAB)


@functools.cache
def dense(kind: str) -> tuple[LMConfig, dict, jax.Array]:
    """A dense 2-block LM of FFN ``kind`` with biases, random (non-zero) parameters, and its logits on TOKENS.

    Parameters are drawn directly (not by ``init``, which would cost a compilation); biases and norm parameters
    are non-zero so that their handling is tested too."""
    cfg = LMConfig(vocab_size=VOCAB, d_model=D, num_layers=2, num_heads=2, ffn_kind=kind, use_bias=True,
                   activation="silu" if kind == "glu" else "gelu", dense_hidden_dim=F)
    shapes = meta.unbox(jax.eval_shape(TransformerLM(cfg).init, jax.random.key(0), TOKENS))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        x = rng.normal(size=leaf.shape) * 0.3
        return jnp.asarray(1.0 + x / 3 if path[-1].key == "scale" else x, jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return cfg, params, logits(cfg, params)


def logits(cfg: LMConfig, params: dict) -> jax.Array:
    """float32[B, L, V] of TransformerLM(cfg) on TOKENS (one jit compilation per config)."""
    return jax.jit(lambda p, t: TransformerLM(cfg).apply({"params": p}, t)[0])(params, TOKENS)


def expert_tree(params: dict, block: int) -> dict:
    return params["decoder"][f"block_{block}"]["ffn"]["experts"]


# Each value of each axis (kind, blocks, k) is covered; the full 2x2x2 grid would only add compilations.
@pytest.mark.parametrize("kind,layers,k", [("glu", "all", 1), ("glu", "every_other", 2), ("mlp", "all", 2)])
def test_copy_reproduces_dense(kind, layers, k):
    cfg, params, want = dense(kind)
    new_cfg, new_params = upcycle(cfg, params, num_experts=E, k=k, layers=layers, rng=jax.random.key(2))
    moe_blocks = [i for i in range(cfg.num_layers) if new_cfg.is_moe_block(i)]
    assert moe_blocks == ([0, 1] if layers == "all" else [1])
    assert (new_cfg.moe.num_experts, new_cfg.moe.hidden_dim, new_cfg.moe.router.k) == (E, F, k)
    # The router is random (not zero) and the output is still exact: renormalised weights sum to 1 per token.
    assert float(jnp.abs(new_params["decoder"]["block_1"]["ffn"]["router"]["kernel"]).max()) > 0
    np.testing.assert_allclose(logits(new_cfg, new_params), want, atol=1e-5)


def test_partition_with_every_expert_reproduces_dense_and_fewer_do_not():
    cfg, params, want = dense("glu")
    new_cfg, new_params = upcycle(cfg, params, num_experts=E, k=E, mode="partition", rng=jax.random.key(3))
    assert (new_cfg.moe.hidden_dim, new_cfg.moe.router.routed_scaling) == (F // E, float(E))
    # The default router is zero at k = E: uniform softmax, renormalised and scaled by E, is weight 1 per expert.
    assert not jnp.any(new_params["decoder"]["block_0"]["ffn"]["router"]["kernel"])
    np.testing.assert_allclose(logits(new_cfg, new_params), want, atol=1e-5)
    # With k < E each token sees only k of the E disjoint neuron sets (scaled by E/k): an approximation of the
    # dense FFN, not the dense FFN, so the logits must differ.
    cfg2, params2 = upcycle(cfg, params, num_experts=E, k=2, mode="partition", rng=jax.random.key(3))
    assert jnp.any(params2["decoder"]["block_0"]["ffn"]["router"]["kernel"])     # random: ties would pick 0..k-1
    assert float(jnp.abs(logits(cfg2, params2) - want).max()) > 1e-2


def test_partition_splits_neurons_disjointly_and_deterministically():
    cfg, params, _ = dense("mlp")
    dense_ffn = params["decoder"]["block_0"]["ffn"]
    _, a = upcycle(cfg, params, num_experts=E, k=E, mode="partition", rng=jax.random.key(5))
    _, b = upcycle(cfg, params, num_experts=E, k=E, mode="partition", rng=jax.random.key(5))
    _, c = upcycle(cfg, params, num_experts=E, k=E, mode="partition", rng=jax.random.key(6))
    same = jax.tree_util.tree_map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
    assert all(jax.tree_util.tree_leaves(same))
    experts = expert_tree(a, 0)
    assert experts["w_in"].shape == (E, D, F // E) and experts["w_out"].shape == (E, F // E, D)
    # Every dense neuron is in exactly one expert, with its input column, bias and output row together.
    w_in = np.asarray(dense_ffn["w_in"])
    idx = np.array([[int(np.flatnonzero((w_in == col[:, None]).all(0))[0]) for col in np.asarray(experts["w_in"][e]).T]
                    for e in range(E)])                                         # [E, F/E] dense neuron of each
    assert sorted(idx.ravel().tolist()) == list(range(F))
    for e in range(E):
        np.testing.assert_array_equal(experts["w_in"][e], dense_ffn["w_in"][:, idx[e]])
        np.testing.assert_array_equal(experts["b_in"][e], dense_ffn["b_in"][idx[e]])
        np.testing.assert_array_equal(experts["w_out"][e], dense_ffn["w_out"][idx[e]])
    np.testing.assert_allclose(experts["b_out"].sum(0), dense_ffn["b_out"], rtol=1e-6)
    assert not np.array_equal(expert_tree(c, 0)["w_in"], experts["w_in"])


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_noise_has_the_requested_relative_std(noise):
    cfg, params, _ = dense("glu")
    _, new_params = upcycle(cfg, params, num_experts=E, k=2, noise=noise, rng=jax.random.key(7))
    for block in (0, 1):
        dense_ffn = params["decoder"][f"block_{block}"]["ffn"]
        experts = expert_tree(new_params, block)
        for name in ("w_gate", "w_up", "w_down", "b_gate"):
            w = np.asarray(dense_ffn[name])
            rms = np.sqrt(np.mean(w ** 2))
            rel = (np.asarray(experts[name]) - w[None]) / rms                  # [E, ...] in units of rms(w)
            assert abs(rel.std() / noise - 1) < 0.15, (name, rel.std())
            # Copies differ from each other by about sqrt(2) * noise: independent draws, not one shared offset.
            between = (np.asarray(experts[name][0]) - np.asarray(experts[name][1])) / rms
            assert abs(between.std() / (noise * np.sqrt(2)) - 1) < 0.3, (name, between.std())


def test_returns_a_complete_tree_and_leaves_the_rest_untouched():
    cfg, params, _ = dense("glu")
    before = jax.tree_util.tree_map(np.asarray, params)
    # A variables dict with a boxed leaf: accepted, returned in the same (variables) form with plain arrays.
    boxed = {**params, "embed": {"embedding": nn.LogicallyPartitioned(params["embed"]["embedding"],
                                                                       ("vocab", "embed"))}}
    for mode in ("copy", "partition"):
        new_cfg, variables = upcycle(cfg, {"params": boxed}, num_experts=E, k=2, mode=mode, layers=(1,))
        new_params = variables["params"]
        want = meta.unbox(jax.eval_shape(TransformerLM(new_cfg).init, jax.random.key(0), TOKENS))["params"]
        shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), new_params)
        assert shapes == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), want)
        assert new_params["decoder"]["block_0"] == params["decoder"]["block_0"]      # not upcycled: same arrays
        np.testing.assert_array_equal(new_params["embed"]["embedding"], params["embed"]["embedding"])
        for name in ("attn", "attn_norm", "ffn_norm"):
            assert new_params["decoder"]["block_1"][name] == params["decoder"]["block_1"][name]
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), before, params)
    assert all(jax.tree_util.tree_leaves(same))                                       # the input is not modified


def test_upcycled_model_trains():
    cfg, params, _ = dense("mlp")
    new_cfg, new_params = upcycle(cfg, params, num_experts=E, k=2, noise=0.01, rng=jax.random.key(8), layers=(1,))
    model = TransformerLM(new_cfg)
    tx = optax.adam(1e-2)

    def loss_fn(p):
        out, stats = model.apply({"params": p}, TOKENS)
        ce = optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], TOKENS[:, 1:]).mean()
        return ce + sum(s.losses.get("load_balance", 0.0) for s in stats)       # weight 1e-2, the default

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(new_params)
    losses = []
    for _ in range(5):
        new_params, opt, loss = step(new_params, opt)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    # The experts received different updates (different tokens and weights): the copies diverge.
    w = expert_tree(new_params, 1)["w_in"]
    assert float(jnp.abs(w[0] - w[1]).max()) > 1e-3


def test_layer_pattern_expresses_every_block_set():
    moe = MoEConfig(num_experts=2, hidden_dim=4, router=RouterConfig(k=1))
    for n in (1, 2, 4, 5):
        for r in range(1, n + 1):
            for blocks in itertools.combinations(range(n), r):
                every, dense_layers = layer_pattern(blocks, n)
                probe = LMConfig(vocab_size=VOCAB, d_model=D, num_layers=n, num_heads=2, moe=moe, moe_every=every,
                                 dense_layers=dense_layers)
                assert tuple(i for i in range(n) if probe.is_moe_block(i)) == blocks
    assert layer_pattern((1, 3), 4) == (2, ())
    assert layer_pattern((3,), 4) == (4, ())
    assert layer_pattern((0, 2), 4) == (1, (1, 3))


@pytest.mark.parametrize("kwargs,names", [
    (dict(num_experts=0, k=1), "num_experts=0"),
    (dict(num_experts=4, k=0), "k=0"),
    (dict(num_experts=4, k=5), "k=5"),
    (dict(num_experts=4, k=2, mode="split"), "mode='split'"),
    (dict(num_experts=4, k=2, noise=-0.1), "noise=-0.1"),
    (dict(num_experts=4, k=2, noise=float("nan")), "noise=nan"),
    (dict(num_experts=4, k=4, mode="partition", noise=0.1), "noise=0.1"),
    (dict(num_experts=5, k=5, mode="partition"), "num_experts=5"),
    (dict(num_experts=4, k=2, layers="odd"), "layers='odd'"),
    (dict(num_experts=4, k=2, layers=(2,)), "layers=(2,)"),
    (dict(num_experts=4, k=2, layers=(1, 1)), "layers=(1, 1)"),
    (dict(num_experts=4, k=2, layers=()), "layers=()"),
    (dict(num_experts=4, k=2, router_init_scale=-1.0), "router_init_scale=-1.0"),
])
def test_errors_name_the_argument(kwargs, names):
    cfg, params, _ = dense("mlp")
    with pytest.raises(ValueError) as err:
        upcycle(cfg, params, **kwargs)
    message = str(err.value)
    assert message.startswith(names) and "\n" not in message, message


def test_refuses_moe_config_and_wrong_params():
    cfg, params, _ = dense("mlp")
    moe_cfg, moe_params = upcycle(cfg, params, num_experts=E, k=1)
    with pytest.raises(ValueError, match=r"^config\.moe"):
        upcycle(moe_cfg, moe_params, num_experts=E, k=1)
    one_block = LMConfig(vocab_size=VOCAB, d_model=D, num_layers=1, num_heads=2, dense_hidden_dim=F)
    with pytest.raises(ValueError, match=r"^layers='every_other': selects no block"):
        upcycle(one_block, params, num_experts=E, k=1, layers="every_other")
    glu_cfg = dense("glu")[0]
    with pytest.raises(ValueError, match=r"^params: decoder/block_0/ffn has"):
        upcycle(glu_cfg, params, num_experts=E, k=1)           # mlp parameters under a glu config
