"""Expert surgery on arrays: merging (M-SMoE and its baselines), compression (low rank, shared basis), quantization.

Oracle style: each property is checked against something known exactly (a permutation we applied, identical
experts, matrix ranks, scales computed by hand), on small shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moejax.experts.ffn import Dense, ffn
from moejax.models import build_model
from moejax.surgery import compress, merge
from moejax.surgery.quantize import (all_weights, dense_ffn_only, experts_only, input_axes, quantization_error,
                                     quantize, quantize_tree, shared_experts_only)

D, F = 6, 8
SHAPES = {"glu": {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D), "b_gate": (F,), "b_up": (F,), "b_down": (D,)},
          "mlp": {"w_in": (D, F), "w_out": (F, D), "b_in": (F,), "b_out": (D,)}}


def expert(kind, seed, bias=True):
    """One random expert {name: float32[...]} (no expert axis)."""
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in SHAPES[kind].items()
            if bias or n.startswith("w_")}


def stack(experts):
    return {n: jnp.stack([e[n] for e in experts]) for n in experts[0]}


def unstack(experts, e):
    return {n: w[e] for n, w in experts.items()}


def run(p, kind, x):
    return ffn(p, x, Dense(), kind=kind, activation="gelu")


def kernel(num_experts, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(D, num_experts)), jnp.float32)


def assert_experts_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]), err_msg=n)


# ---------------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("kind,bias", [("glu", True), ("mlp", True), ("glu", False), ("mlp", False)])
def test_align_recovers_a_neuron_permutation(kind, bias):
    ref = expert(kind, 0, bias)
    p = np.random.default_rng(1).permutation(F)
    other = merge.permute_neurons(ref, p)                      # neuron i of other = neuron p[i] of ref
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, D)), jnp.float32)
    np.testing.assert_allclose(run(other, kind, x), run(ref, kind, x), rtol=1e-5, atol=1e-6)   # same function
    assert not np.array_equal(np.asarray(other[next(iter(other))]), np.asarray(ref[next(iter(ref))]))
    perm, aligned = merge.align(ref, other)
    np.testing.assert_array_equal(np.asarray(perm), np.argsort(p))      # the inverse of what we applied
    assert_experts_equal(aligned, ref)
    perm_self, same = merge.align(ref, ref)
    np.testing.assert_array_equal(np.asarray(perm_self), np.arange(F))
    assert_experts_equal(same, ref)


@pytest.mark.parametrize("method", merge.METHODS)
@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_merging_identical_experts_is_exact(method, kind):
    e = expert(kind, 3)
    experts = stack([e] * 5)
    freq = jnp.asarray([0.1, 0.4, 0.0, 0.3, 0.2])
    k = kernel(5)
    out = merge.merge_layer(experts, k, freq, merge.router_similarity(k), 2, method=method)
    np.testing.assert_array_equal(np.asarray(out.leaders), [1, 3])
    for g in range(2):
        assert_experts_equal(unstack(out.experts, g), e)
    np.testing.assert_array_equal(np.asarray(out.router_kernel), np.asarray(k)[:, [1, 3]])


def permuted_copies_layer(kind):
    """Two distinct leaders (experts 0 and 3, most frequent) and members that are neuron-permuted copies of them;
    members' router columns are near their leader's so that router_similarity groups them correctly."""
    rng = np.random.default_rng(4)
    a, b = expert(kind, 5), expert(kind, 6)
    perm = lambda e: merge.permute_neurons(e, rng.permutation(F))     # noqa: E731
    experts = stack([a, perm(a), perm(b), b, perm(a)])
    base = np.asarray(kernel(2, seed=7))
    cols = base[:, [0, 0, 1, 1, 0]] + 0.05 * rng.normal(size=(D, 5))
    freq = jnp.asarray([0.4, 0.1, 0.05, 0.3, 0.15])
    return experts, jnp.asarray(cols, jnp.float32), freq, a, b


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_msmoe_aligns_permuted_members_onto_their_leader_and_averaging_does_not(kind):
    experts, k, freq, a, b = permuted_copies_layer(kind)
    sim = merge.router_similarity(k)
    out = merge.merge_layer(experts, k, freq, sim, 2, method="msmoe")
    np.testing.assert_array_equal(np.asarray(out.assignment), [0, 0, 1, 1, 0])
    x = jnp.asarray(np.random.default_rng(8).normal(size=(7, D)), jnp.float32)
    for g, leader in enumerate([a, b]):
        merged = unstack(out.experts, g)
        for n in leader:
            np.testing.assert_allclose(merged[n], leader[n], rtol=1e-6, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(run(merged, kind, x), run(leader, kind, x), rtol=1e-5, atol=1e-5)
    for method in ("average", "frequency"):     # no alignment: the permuted copies blur the leader's function
        plain = merge.merge_layer(experts, k, freq, sim, 2, method=method)
        err = jnp.max(jnp.abs(run(unstack(plain.experts, 0), kind, x) - run(a, kind, x)))
        assert err > 0.1, (method, float(err))


@pytest.mark.parametrize("method", ["msmoe", "frequency"])
def test_a_member_with_zero_frequency_does_not_change_its_leader(method):
    experts = stack([expert("glu", s) for s in range(4)])
    k = kernel(4)
    freq = jnp.asarray([0.5, 0.0, 0.5, 0.0])
    sim = np.eye(4)
    sim[1, 0] = sim[3, 2] = 0.9                                   # 1 joins 0, 3 joins 2
    out = merge.merge_layer(experts, k, freq, sim, 2, method=method)
    np.testing.assert_array_equal(np.asarray(out.assignment), [0, 0, 1, 1])
    assert_experts_equal(unstack(out.experts, 0), unstack(experts, 0))
    assert_experts_equal(unstack(out.experts, 1), unstack(experts, 2))
    avg = merge.merge_layer(experts, k, freq, sim, 2, method="average")      # the plain mean does change it
    assert not np.allclose(avg.experts["w_up"][0], experts["w_up"][0])
    # Frequency weights are used as given: member 1 at a third of the group's frequency counts for a third.
    third = merge.merge_layer(experts, k, jnp.asarray([0.2, 0.1, 0.5, 0.0]), sim, 2, method="frequency")
    np.testing.assert_allclose(third.experts["w_up"][0], (2 * experts["w_up"][0] + experts["w_up"][1]) / 3,
                               rtol=1e-6, atol=1e-6)


def test_prune_keeps_the_most_frequent_experts_and_their_router_columns():
    experts = stack([expert("mlp", s) for s in range(6)])
    k = kernel(6)
    freq = jnp.asarray([0.05, 0.3, 0.1, 0.02, 0.25, 0.28])
    out = merge.merge_layer(experts, k, freq, merge.router_similarity(k), 3, method="prune")
    np.testing.assert_array_equal(np.asarray(out.leaders), [1, 4, 5])
    assert_experts_equal(out.experts, {n: w[jnp.asarray([1, 4, 5])] for n, w in experts.items()})
    np.testing.assert_array_equal(np.asarray(out.router_kernel), np.asarray(k)[:, [1, 4, 5]])
    full = merge.merge_layer(experts, k, freq, merge.router_similarity(k), 6, method="msmoe")   # G = E: unchanged
    assert_experts_equal(full.experts, experts)
    np.testing.assert_array_equal(np.asarray(full.assignment), np.arange(6))


def test_grouping_maps_every_expert_to_a_group_and_each_leader_to_its_own():
    rng = np.random.default_rng(9)
    freq = rng.random(12)
    sim = rng.normal(size=(12, 12))
    for g in (1, 3, 5, 12):
        assignment = np.asarray(merge.group_experts(freq, sim, g))
        leaders = np.asarray(merge.dominant_experts(freq, g))
        np.testing.assert_array_equal(leaders, np.sort(np.argsort(-freq)[:g]))
        assert assignment.shape == (12,) and set(assignment) == set(range(g))
        np.testing.assert_array_equal(assignment[leaders], np.arange(g))
        others = np.setdiff1d(np.arange(12), leaders)
        np.testing.assert_array_equal(assignment[others], np.argmax(sim[others][:, leaders], axis=1))
    # Ties in frequency go to the lower index.
    np.testing.assert_array_equal(np.asarray(merge.dominant_experts([1.0, 2.0, 2.0, 2.0], 2)), [1, 2])


def test_router_similarity_is_the_cosine_of_kernel_columns():
    k = np.asarray(kernel(5), np.float64)
    k[:, 4] = 0.0
    s = np.asarray(merge.router_similarity(jnp.asarray(k, jnp.float32)))
    n = np.linalg.norm(k, axis=0)
    expected = (k.T @ k) / np.maximum(np.outer(n, n), 1e-30)
    np.testing.assert_allclose(s, expected, atol=1e-6)
    np.testing.assert_allclose(np.diag(s)[:4], 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- compression


def layer(kind="glu", num=3):
    return stack([expert(kind, 20 + s) for s in range(num)])


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_low_rank_is_exact_at_full_rank_and_has_the_requested_rank(kind):
    experts = layer(kind)
    full = compress.low_rank(experts, min(D, F))
    for n, w in experts.items():
        assert full[n].shape == w.shape and full[n].dtype == w.dtype
        np.testing.assert_allclose(full[n], w, rtol=1e-4, atol=1e-5, err_msg=n)
    for r in (1, 3):
        low = compress.low_rank(experts, r)
        for n, w in experts.items():
            if n.startswith("b_"):
                assert low[n] is w                                    # biases untouched
                continue
            for e in range(w.shape[0]):
                assert np.linalg.matrix_rank(np.asarray(low[n][e], np.float64), tol=1e-4) == r
                # Eckart-Young: the error is exactly the dropped singular values.
                s = np.linalg.svd(np.asarray(w[e], np.float64), compute_uv=False)
                np.testing.assert_allclose(np.linalg.norm(np.asarray(w[e] - low[n][e])), np.sqrt(np.sum(s[r:] ** 2)),
                                           rtol=1e-4)


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_shared_basis_is_exact_at_full_rank_and_shares_one_subspace(kind):
    experts = layer(kind)
    full = compress.shared_basis(experts, D)
    for n, w in experts.items():
        assert full[n].shape == w.shape and full[n].dtype == w.dtype
        np.testing.assert_allclose(full[n], w, rtol=1e-4, atol=1e-5, err_msg=n)
    r = 2
    shared = compress.shared_basis(experts, r)
    for n, w in shared.items():
        if n.startswith("b_"):
            assert w is experts[n]
            continue
        views = [np.asarray(w[e] if n in merge.INPUT_MATRICES else w[e].T, np.float64) for e in range(w.shape[0])]
        assert np.linalg.matrix_rank(np.concatenate(views, axis=1), tol=1e-4) == r     # [D, E*F] spans r dims
    factors = compress.shared_basis_factors(experts, r)
    for n, (basis, coeffs) in factors.items():
        assert basis.shape == (D, r) and coeffs.shape == (3, r, F)
        np.testing.assert_allclose(basis.T @ basis, np.eye(r), atol=1e-5)


def test_compression_ratio_counts_parameters():
    experts = layer("glu", num=4)                    # 3 matrices of 4 x 6 x 8, biases 4 x (8 + 8 + 6)
    dense = 3 * 4 * D * F + 4 * (F + F + D)
    low = compress.compression_ratio(experts, 2)
    assert low["dense"] == dense
    assert low["factorised"] == dense - 3 * 4 * D * F + 3 * 4 * 2 * (D + F)
    shared = compress.compression_ratio(experts, 2, method="shared_basis")
    assert shared["factorised"] == dense - 3 * 4 * D * F + 3 * (D * 2 + 4 * 2 * F)
    assert shared["ratio"] == pytest.approx(shared["factorised"] / dense)


# ---------------------------------------------------------------------------------------------------- quantization


def weights(seed=0, shape=(3, 16, 5)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_quantize_at_16_bits_is_within_float_rounding():
    w = weights()
    q = quantize(w, 16, axis=1)
    amax = np.max(np.abs(np.asarray(w)), axis=1, keepdims=True)
    assert np.all(np.abs(np.asarray(q - w)) <= amax * 2.0 ** -16 * 1.0001)   # half a step of 1/32767
    wb = w.astype(jnp.bfloat16)
    qb = quantize(wb, 16, axis=1)
    assert qb.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: the 16-bit grid is finer, so at most one bfloat16 rounding step moves.
    np.testing.assert_allclose(np.asarray(qb, np.float32), np.asarray(wb, np.float32), rtol=2.0 ** -8,
                               atol=float(amax.max()) * 2.0 ** -15)


def test_quantize_at_8_bits_is_within_half_a_scale_and_keeps_zeros():
    w = np.array(weights(1))
    w[0, 3, :] = 0.0                                # zero entries
    w[1, :, 2] = 0.0                                # an all-zero channel
    q = np.asarray(quantize(jnp.asarray(w), 8, axis=1))
    scale = np.max(np.abs(w), axis=1, keepdims=True) / 127
    assert np.all(np.abs(q - w) <= scale / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(q[w == 0] == 0)
    np.testing.assert_array_equal(q[1, :, 2], 0.0)
    levels = q / np.where(scale > 0, scale, 1)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)        # on the grid
    for bits in (2, 3, 4):
        qb = np.asarray(quantize(jnp.asarray(w), bits, axis=1))
        qmax = 2 ** (bits - 1) - 1
        for e in range(3):
            for c in range(5):
                assert len(np.unique(qb[e, :, c])) <= 2 * qmax + 1


def test_quantize_scales_each_output_channel_independently():
    w = np.array(weights(2))
    q = np.asarray(quantize(jnp.asarray(w), 4, axis=1))
    w2 = w.copy()
    w2[1, :, 3] *= 1000.0                          # one output channel of one expert
    q2 = np.asarray(quantize(jnp.asarray(w2), 4, axis=1))
    mask = np.ones(w.shape, bool)
    mask[1, :, 3] = False
    np.testing.assert_array_equal(q2[mask], q[mask])
    np.testing.assert_allclose(q2[1, :, 3], q[1, :, 3] * 1000.0, rtol=1e-5)


def random_values(tree, seed=0):
    """A param tree of the given structure (from jax.eval_shape) with random values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), tree)


LM_CFG = {"kind": "transformer_lm", "d_model": 16, "num_layers": 2, "num_heads": 2, "moe_every": 2,
          "dense_hidden_dim": 32, "moe": {"num_experts": 4, "hidden_dim": 16, "num_shared_experts": 1,
                                          "shared_gate": True, "expert_kind": "glu", "router": {"k": 2}}}
MLP_CFG = {"kind": "mlp", "d_model": 16, "layers": [{"num_experts": 4, "hidden_dim": 8}, 32]}


def params_of(cfg, x, **kw):
    model = build_model(cfg, **kw)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return random_values(meta.unbox(shapes)["params"])


def paths(tree, select):
    return {"/".join(str(k.key) for k in keys) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if select("/".join(str(k.key) for k in keys)) and leaf.ndim >= 2}


def test_selectors_on_real_param_trees():
    lm = params_of(LM_CFG, jnp.zeros((1, 4), jnp.int32), vocab_size=32)
    experts = {f"decoder/block_1/ffn/experts/{n}" for n in ("w_gate", "w_up", "w_down")}
    shared = {f"decoder/block_1/ffn/shared/{n}" for n in ("w_gate", "w_up", "w_down")}
    dense = {"decoder/block_0/ffn/w_in", "decoder/block_0/ffn/w_out"}
    attn = {f"decoder/block_{i}/attn/{n}/kernel" for i in (0, 1) for n in ("query", "key", "value", "out")}
    assert paths(lm, experts_only) == experts
    assert paths(lm, shared_experts_only) == shared
    assert paths(lm, dense_ffn_only) == dense
    assert paths(lm, all_weights) == experts | shared | dense | attn | {
        "decoder/block_1/ffn/router/kernel", "decoder/block_1/ffn/shared_gate/kernel"}   # tied head
    mlp = params_of(MLP_CFG, jnp.zeros((1, 8)), num_classes=3)
    assert paths(mlp, experts_only) == {"layer_0/experts/w_in", "layer_0/experts/w_out"}
    assert paths(mlp, dense_ffn_only) == {"layer_1/w_in", "layer_1/w_out"}
    assert input_axes("decoder/block_1/ffn/experts/w_gate", 3) == (1,)
    assert input_axes("decoder/block_0/attn/out/kernel", 3) == (0, 1)
    assert input_axes("decoder/block_0/attn/query/kernel", 3) == (0,)


def test_quantize_tree_with_experts_only_changes_only_the_experts():
    lm = {"params": params_of(LM_CFG, jnp.zeros((1, 4), jnp.int32), vocab_size=32)}
    q = quantize_tree(lm, 4, select=experts_only)
    assert jax.tree.structure(q) == jax.tree.structure(lm)
    changed = set()
    for (keys, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(lm)[0],
                                 jax.tree_util.tree_flatten_with_path(q)[0]):
        path = "/".join(str(k.key) for k in keys)
        assert a.shape == b.shape and a.dtype == b.dtype
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            changed.add(path)
    assert changed == {f"params/decoder/block_1/ffn/experts/{n}" for n in ("w_gate", "w_up", "w_down")}
    w = lm["params"]["decoder"]["block_1"]["ffn"]["experts"]["w_up"]
    np.testing.assert_array_equal(q["params"]["decoder"]["block_1"]["ffn"]["experts"]["w_up"], quantize(w, 4, axis=1))
    report = quantization_error(lm, q, experts_only)
    assert set(report["per_param"]) == changed and report["num_params"] == 3 * 4 * 16 * 16
    assert 0 < report["relative_error"] < 0.3
    fine = quantization_error(lm, quantize_tree(lm, 8, select=experts_only), experts_only)
    assert fine["relative_error"] < report["relative_error"] / 4


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_one_line_errors_naming_the_argument():
    experts = layer("glu", num=4)
    k, freq = kernel(4), jnp.asarray([0.4, 0.3, 0.2, 0.1])
    sim = merge.router_similarity(k)
    cases = [
        (lambda: quantize(weights(), 5, axis=1), "bits=5"),
        (lambda: quantize(weights(), True, axis=1), "bits=True"),
        (lambda: quantize_tree({"w_in": weights()}, 1, select=all_weights), "bits=1"),
        (lambda: quantize(weights(), 8, axis=3), "axis=3"),
        (lambda: compress.low_rank(experts, 0), "rank=0"),
        (lambda: compress.low_rank(experts, min(D, F) + 1), f"rank={min(D, F) + 1}"),
        (lambda: compress.shared_basis(experts, D + 1), f"rank={D + 1}"),
        (lambda: compress.compression_ratio(experts, 2, method="tucker"), "method='tucker'"),
        (lambda: merge.merge_layer(experts, k, freq, sim, 0), "num_groups=0"),
        (lambda: merge.merge_layer(experts, k, freq, sim, 5), "num_groups=5"),
        (lambda: merge.merge_layer(experts, k, freq, sim, 2, method="ties"), "method='ties'"),
        (lambda: merge.merge_layer(experts, k, -freq, sim, 2), "frequency"),
        (lambda: merge.merge_layer(experts, kernel(3), freq, sim, 2), "router_kernel"),
        (lambda: merge.group_experts(freq, sim[:3], 2), "similarity"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith(name) and "\n" not in message, message
