"""Token ids reach the hash-routed MoE layers of the Transformer LM (Roller et al. 2021's Hash Layers).

The routing is read from the ``Router`` modules' outputs (``capture_intermediates``) and compared with
``hash_routing`` of the input tokens: the same id goes to the same experts at every position, in every sequence,
in every block and chain iteration, also under expert parallelism on the 8-device CPU mesh.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.context import LayerContext
from moejax import parallel
from moejax.models import Encoder, LMConfig, TransformerLM
from moejax.parallel import MeshConfig, expert_parallel, make_mesh
from moejax.routing import Router, hash_routing

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

E, K, SEED, V = 8, 2, 3, 256


@functools.cache
def lm(layer: str = "sparse", num_layers: int = 2) -> TransformerLM:
    moe = {"num_experts": E, "hidden_dim": 8, "expert_kind": "glu", "activation": "silu", "use_bias": False,
           "router": {"kind": "hash", "k": K, "seed": SEED},
           "dispatch": {"mode": "dropless", "gmm": "padded", "gmm_tile": 8}}
    if layer == "chain":
        moe.update(layer="chain", chain_iterations=2)
    return TransformerLM(LMConfig.from_dict({"vocab_size": V, "d_model": 16, "num_layers": num_layers,
                                             "num_heads": 2, "moe": moe}))


def repeated_ids(b: int = 8, length: int = 32) -> jnp.ndarray:
    """int32[b, length]: every id of a random half of the vocabulary, twice, at unrelated (row, position)s."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(V)[: b * length // 2]
    both = np.concatenate([ids, rng.permutation(ids)])
    return jnp.asarray(both.reshape(b, length), jnp.int32)


@functools.cache
def functions(model: TransformerLM):
    """Jitted ``init(tokens) -> params`` and ``forward(params, tokens) -> (logits, intermediates)`` of ``model``,
    the intermediates being the outputs of its ``Router`` modules."""
    # unsafe_rbg keys compile much faster than threefry on XLA:CPU; the tests need no statistical quality.
    init = jax.jit(lambda t: nn.unbox(model.init(jax.random.key(0, impl="unsafe_rbg"), t))["params"])

    @jax.jit
    def forward(params, tokens):
        out, state = model.apply({"params": params}, tokens, mutable=["intermediates"],
                                 capture_intermediates=lambda m, method: isinstance(m, Router) and method == "__call__")
        return out[0], state["intermediates"]
    return init, forward


def routed(model: TransformerLM, tokens: jnp.ndarray, params=None):
    """(logits, {router path: expert_index int32[B, L, K]}) of one forward pass."""
    init, forward = functions(model)
    logits, inter = forward(init(tokens) if params is None else params, tokens)
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(inter, is_leaf=lambda x: hasattr(x, "expert_index"))[0]:
        if hasattr(leaf, "expert_index"):
            found[jax.tree_util.keystr(path)] = np.asarray(leaf.expert_index).reshape(*tokens.shape, -1)
    return logits, found


def expected(tokens: jnp.ndarray) -> np.ndarray:
    return np.asarray(hash_routing(tokens.reshape(-1), E, K, seed=SEED).expert_index).reshape(*tokens.shape, K)


def test_lm_hash_layers_route_every_occurrence_of_an_id_to_the_same_experts():
    tokens = repeated_ids()
    _, found = routed(lm(), tokens)
    assert len(found) == 2 and all("block_" in p and "router" in p for p in found)     # both MoE blocks
    want = expected(tokens)
    ids = np.asarray(tokens)
    for path, index in found.items():
        np.testing.assert_array_equal(index, want, err_msg=path)
        # Each id occurs twice, in different rows and positions (so hashing positions would split them).
        by_id = {}
        for (b, pos), i in np.ndenumerate(ids):
            by_id.setdefault(i, set()).add(tuple(index[b, pos]))
        assert all(len(s) == 1 for s in by_id.values()), path
        # Different ids spread over all experts, none with more than twice its share of the copies.
        counts = np.bincount(index.reshape(-1), minlength=E)
        assert (counts > 0).all() and counts.max() < 2 * counts.mean(), counts


def test_same_token_everywhere_gets_the_same_experts_and_the_same_output():
    # One id at every position of every row: a position hash would use about all 8 experts here.
    tokens = jnp.full((8, 32), 65, jnp.int32)
    logits, found = routed(lm(), tokens)
    assert len(found) == 2
    for index in found.values():
        assert len({tuple(r) for r in index.reshape(-1, K)}) == 1
        np.testing.assert_array_equal(index[0, 0], expected(tokens[:1, :1])[0, 0])
    # Without ids the layer would hash positions: feeding the same ids explicitly as positions changes experts.
    by_position = expected(jnp.arange(tokens.size).reshape(tokens.shape))
    assert len({tuple(r) for r in by_position.reshape(-1, K)}) > 1
    assert np.isfinite(np.asarray(logits)).all()


def test_chain_iterations_hash_the_token_ids():
    tokens = repeated_ids(2, 16)
    _, found = routed(lm("chain", num_layers=1), tokens)
    assert sorted(p.split("iteration_")[1][0] for p in found) == ["0", "1"]
    for index in found.values():
        np.testing.assert_array_equal(index, expected(tokens))


def test_token_ids_must_match_the_activations():
    cfg = lm().config
    x = jnp.zeros((2, 8, cfg.d_model))
    with pytest.raises(ValueError, match=r"^token_ids: expected int\[B, L\] = \(2, 8\)"):
        jax.eval_shape(lambda: Encoder(cfg, causal=True, rope_base=cfg.rope_base).init(
            jax.random.key(0), x, LayerContext(token_ids=jnp.zeros((2, 7), jnp.int32))))


def test_hash_lm_under_expert_parallelism_routes_by_token_id_and_matches_one_device(monkeypatch):
    tokens = repeated_ids()                                      # 8 sequences over 8 token shards
    model = lm()                                                 # the one-device run is the first test's
    params = functions(model)[0](tokens)
    want_logits, want = routed(model, tokens, params)
    traced = []                                                  # the expert-parallel dispatch really runs
    dropless = expert_parallel.dropless_apply
    monkeypatch.setattr(expert_parallel, "dropless_apply", lambda *a, **kw: traced.append(1) or dropless(*a, **kw))
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        sharded = jax.device_put(tokens, parallel.batch_sharding(mesh))
        logits, found = routed(model, sharded, params)
    assert len(traced) == 2                                      # both MoE blocks
    assert found.keys() == want.keys()
    for path in found:
        np.testing.assert_array_equal(found[path], expected(tokens))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=2e-5, atol=2e-5)
