"""Layer- and expert-side mechanisms (docs/routing_mechanisms.md): Soft MoE, SMEAR, MoE++ zero-computation
experts, Chain-of-Experts, their selection from model configs and gating-residual threading in the models
(the example configs in configs/mechanisms/ are trained in tests/test_mechanism_configs.py)."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.context import LayerContext
from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, dispatch, reference
from moejax.experts import ZeroComputationExperts, heterogeneous_load_balance, merge_params, split_routing
from moejax.layers import ChainOfExpertsLayer, SMEARLayer, SoftMoELayer, make_layer, soft_logits, soft_routing
from moejax.models import build_model
from moejax.models.blocks import make_ffn
from moejax.models.config import MLPConfig
from moejax.routing import Router, top_k_routing
from moejax.routing.aux_losses.load_balance import LoadBalance
from moejax.routing.loss import loss_inputs
from trees import assert_trees_close

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

D = 6


def unboxed_init(layer, x, seed=1):
    return nn.unbox(jax.jit(layer.init)(jax.random.key(seed), x))


def jitted(layer, **kw):
    """``layer.apply(variables, x, **kw)`` compiled once (eager op-by-op Flax is slower than one compile here)."""
    return jax.jit(lambda variables, x: layer.apply(variables, x, **kw))


# -------------------------------------------------------------------------------------------------- Soft MoE


def test_soft_routing_dispatch_columns_and_combine_rows_sum_to_one():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 7, 3, 2))          # [G, M, E, S]
    r = soft_routing(logits)
    np.testing.assert_allclose(r.dispatch.sum(axis=1), np.ones((2, 3, 2)), rtol=1e-6)   # over tokens, per slot
    np.testing.assert_allclose(r.combine.sum(axis=(2, 3)), np.ones((2, 7)), rtol=1e-6)  # over slots, per token
    assert (np.asarray(r.dispatch) > 0).all() and (np.asarray(r.combine) > 0).all()
    np.testing.assert_allclose(r.expert_share.sum(-1), np.ones((2, 7)), rtol=1e-6)


def numpy_soft_moe(x, params, normalize):
    """Soft MoE written out in numpy for x [G, M, D], mlp experts with gelu (exact) and biases."""
    x = np.asarray(x, np.float64)
    phi = np.asarray(params["phi"], np.float64)                                   # [D, E, S]
    if normalize:
        xn = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
        pn = float(params["scale"]) * phi / np.sqrt((phi * phi).sum(0, keepdims=True) + 1e-6)
        logits = np.einsum("gmd,des->gmes", xn, pn)
    else:
        logits = np.einsum("gmd,des->gmes", x, phi)
    g, m, e, s = logits.shape
    disp = np.exp(logits - logits.max(1, keepdims=True))
    disp /= disp.sum(1, keepdims=True)
    flat = logits.reshape(g, m, e * s)
    comb = np.exp(flat - flat.max(-1, keepdims=True))
    comb = (comb / comb.sum(-1, keepdims=True)).reshape(g, m, e, s)
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    y = np.zeros_like(x)
    for gi in range(g):
        for ei in range(e):
            for si in range(s):
                slot = (disp[gi, :, ei, si][:, None] * x[gi]).sum(0)              # [D]
                out = gelu(slot @ ex["w_in"][ei] + ex["b_in"][ei]) @ ex["w_out"][ei] + ex["b_out"][ei]
                y[gi] += comb[gi, :, ei, si][:, None] * out[None, :]
    return y


@pytest.mark.parametrize("normalize", [True, False])
def test_soft_moe_matches_a_numpy_computation(normalize):
    cfg = MoEConfig(num_experts=3, hidden_dim=4, layer="soft", soft_slots=2, soft_normalize=normalize)
    x = jax.random.normal(jax.random.key(0), (2, 5, D))                            # 2 groups of 5 tokens
    layer = SoftMoELayer(cfg)
    params = unboxed_init(layer, x)["params"]
    params["experts"]["b_in"] = 0.1 * jax.random.normal(jax.random.key(5), params["experts"]["b_in"].shape)
    if normalize:
        params["scale"] = jnp.asarray(2.5)
    apply = jitted(layer)
    out = apply({"params": params}, x)
    y, stats = out.y, out.stats
    np.testing.assert_allclose(y, numpy_soft_moe(x, params, normalize), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(stats.expert_load.sum(), 1.0, rtol=1e-6)
    assert float(stats.capacity) == 2 and float(stats.experts_per_token) == 3
    # Groups are independent: changing group 1 leaves group 0's output alone.
    y2 = apply({"params": params}, x.at[1].multiply(-2.0)).y
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-6)
    assert not np.allclose(y2[1], y[1])


def test_soft_moe_tiny_example_by_hand():
    # One group of two tokens, one expert with one slot, unnormalised logits x . phi = [0, log 3]:
    # dispatch = softmax over tokens = [1/4, 3/4]; combine = 1 (one slot); with an identity expert
    # (w_in = w_out = I, identity activation, no bias) every token's output is the slot 1/4 x0 + 3/4 x1.
    cfg = MoEConfig(num_experts=1, hidden_dim=2, layer="soft", soft_normalize=False, activation="identity",
                    use_bias=False)
    x = jnp.array([[[1.0, 0.0], [2.0, 1.0]]])
    phi = jnp.array([[[0.0]], [[np.log(3.0)]]])                                    # [D=2, E=1, S=1]
    params = {"phi": phi, "experts": {"w_in": jnp.eye(2)[None], "w_out": jnp.eye(2)[None]}}
    y = SoftMoELayer(cfg).apply({"params": params}, x).y
    slot = 0.25 * np.array([1.0, 0.0]) + 0.75 * np.array([2.0, 1.0])
    np.testing.assert_allclose(y[0], np.stack([slot, slot]), rtol=1e-6)


def test_soft_moe_is_permutation_equivariant_over_tokens():
    cfg = MoEConfig(num_experts=4, hidden_dim=5, layer="soft", soft_slots=3, expert_kind="glu", activation="silu")
    x = jax.random.normal(jax.random.key(2), (3, 8, D))
    layer = SoftMoELayer(cfg)
    variables = unboxed_init(layer, x)
    perm = jax.random.permutation(jax.random.key(3), 8)
    apply = jitted(layer)
    out, out_perm = apply(variables, x), apply(variables, x[:, perm])
    y, stats, y_perm, stats_perm = out.y, out.stats, out_perm.y, out_perm.stats
    np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats_perm.expert_load, stats.expert_load, rtol=1e-5)


def test_soft_moe_gradients_are_finite_and_reach_every_parameter():
    cfg = MoEConfig(num_experts=4, hidden_dim=5, layer="soft", soft_slots=2)
    x = jax.random.normal(jax.random.key(4), (2, 6, D))
    layer = SoftMoELayer(cfg)
    params = unboxed_init(layer, x)["params"]
    grads = jax.jit(jax.grad(lambda p, xx: jnp.sum(jnp.sin(layer.apply({"params": p}, xx).y)), argnums=(0, 1)))(
        params, x)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_soft_logits_normalised_are_bounded_by_the_scale():
    x = 100.0 * jax.random.normal(jax.random.key(0), (1, 4, D))
    phi = jax.random.normal(jax.random.key(1), (D, 2, 3))
    logits = soft_logits(x, phi, jnp.asarray(1.5))
    assert float(jnp.abs(logits).max()) <= 1.5 + 1e-5                             # cosine similarity * scale


# ----------------------------------------------------------------------------------------------------- SMEAR


def smear_oracle(x, params, cfg):
    """Per-example loop: merge the experts with the example's router probabilities, run one FFN."""
    stacked, kernel = params["experts"], params["router"]["kernel"]
    examples = x.reshape(-1, x.shape[-2], D) if cfg.resolved_smear_granularity == "example" else x.reshape(-1, 1, D)
    outs = []
    for ex in examples:
        p = jax.nn.softmax(ex.mean(0) @ kernel)
        merged = {name: sum(p[e] * w[e] for e in range(cfg.num_experts)) for name, w in stacked.items()}
        outs.append(reference.expert_forward(merged, ex, kind=cfg.expert_kind, activation=cfg.activation))
    return jnp.stack(outs).reshape(x.shape)


@pytest.mark.parametrize("granularity,kind", [("example", "mlp"), ("example", "glu"), ("token", "mlp")])
def test_smear_matches_the_per_example_loop_in_values_and_gradients(granularity, kind):
    cfg = MoEConfig(num_experts=4, hidden_dim=5, layer="smear", smear_granularity=granularity, expert_kind=kind,
                    activation="silu" if kind == "glu" else "gelu")
    # The oracle unrolls one FFN per routed group: few tokens keep its compile short.
    x = jax.random.normal(jax.random.key(0), (3, 5, D) if granularity == "example" else (2, 3, D))
    layer = SMEARLayer(cfg)
    params = unboxed_init(layer, x)["params"]
    params["router"]["kernel"] = jax.random.normal(jax.random.key(7), (D, 4))     # decisive but not one-hot
    cot = jax.random.normal(jax.random.key(8), x.shape)
    f = lambda p, xx: jnp.sum(cot * layer.apply({"params": p}, xx).y)              # noqa: E731
    g = lambda p, xx: jnp.sum(cot * smear_oracle(xx, p, cfg))                       # noqa: E731
    np.testing.assert_allclose(jitted(layer)({"params": params}, x).y, jax.jit(smear_oracle, static_argnums=2)(
        x, params, cfg), rtol=2e-5, atol=2e-5)
    assert_trees_close(jax.jit(jax.grad(f, argnums=(0, 1)))(params, x), jax.jit(jax.grad(g, argnums=(0, 1)))(params, x))


def test_smear_one_hot_routing_equals_that_expert_exactly():
    cfg = MoEConfig(num_experts=4, hidden_dim=5, layer="smear")
    x = jax.random.normal(jax.random.key(1), (2, 5, D)).at[..., 0].add(5.0)        # every example's mean x0 > 0
    layer = SMEARLayer(cfg)
    params = unboxed_init(layer, x)["params"]
    params["router"]["kernel"] = jnp.zeros((D, 4)).at[0, 2].set(1e4)              # logit of expert 2 ~ 5e4
    out = jitted(layer)({"params": params}, x)
    y, stats = out.y, out.stats
    np.testing.assert_array_equal(stats.expert_load, [0, 0, 1, 0])
    want = reference.expert_forward(reference.expert_params(params["experts"], 2), x.reshape(-1, D), kind="mlp",
                                    activation="gelu")
    np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-6, atol=1e-6)


def test_smear_merge_is_linear_in_the_parameters():
    k = jax.random.split(jax.random.key(3), 3)
    p1 = {"w": jax.random.normal(k[0], (4, D, 5)), "b": jax.random.normal(k[1], (4, 5))}
    p2 = jax.tree_util.tree_map(lambda v: jnp.cos(v) + 1.0, p1)
    w = jax.nn.softmax(jax.random.normal(k[2], (3, 4)))                          # 3 groups x 4 experts
    combo = jax.tree_util.tree_map(lambda a, b: 2.0 * a - 0.5 * b, p1, p2)
    lhs = merge_params(combo, w)
    rhs = jax.tree_util.tree_map(lambda a, b: 2.0 * a - 0.5 * b, merge_params(p1, w), merge_params(p2, w))
    assert_trees_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    # Identical experts merge to themselves, whatever the router says.
    same = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v[:1], v.shape), p1)
    assert_trees_close(merge_params(same, w), jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v[0], (3,) + v.shape[1:]),
                                                                     p1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------- MoE++ zero-computation

E_FFN, ZERO, COPY, CONST = 4, 1, 1, 2
E_ALL = E_FFN + ZERO + COPY + CONST
ZC_DISPATCHES = {
    "capacity_einsum": DispatchConfig(mode="capacity", capacity_impl="einsum", capacity_factor=0.75),
    "capacity_index_score": DispatchConfig(mode="capacity", capacity_impl="index", capacity_factor=0.75,
                                           priority="score"),
    "dropless_blocked": DispatchConfig(mode="dropless", gmm="blocked", gmm_tile=8),
}


def zc_config(disp: str, **kw) -> MoEConfig:
    return MoEConfig(num_experts=E_FFN, hidden_dim=5, zero_experts=ZERO, copy_experts=COPY, constant_experts=CONST,
                     router=RouterConfig(k=2, renormalize=kw.pop("renormalize", False)),
                     dispatch=ZC_DISPATCHES[disp], **kw)


def zc_init(cfg, seed=0):
    x = jax.random.normal(jax.random.key(seed), (2, 12, D))
    params = unboxed_init(MoELayer(cfg), x, seed + 1)["params"]
    params["router"]["kernel"] = jax.random.normal(jax.random.key(seed + 2), (D, cfg.num_routed))
    return x, params


def zc_reference(cfg, params, x, train):
    tokens = x.reshape(-1, D)
    cap = cfg.capacity(tokens.shape[0], train)
    routing = Router(cfg.num_routed, cfg.router).apply({"params": params["router"]}, tokens, capacity=cap)
    y = reference.zero_computation_moe(
        tokens, routing, params["experts"], params.get("zero_computation"), num_ffn=cfg.num_experts,
        num_zero=cfg.zero_experts, num_copy=cfg.copy_experts, kind=cfg.expert_kind, activation=cfg.activation,
        capacity=cap if cfg.dispatch.mode == "capacity" else None, priority=cfg.dispatch.priority)
    if cfg.num_shared_experts:
        y = y + reference.shared_ffn(tokens, params["shared"], kind=cfg.expert_kind, activation=cfg.activation)
    return y.reshape(x.shape), routing


@functools.partial(jax.jit, static_argnums=(0, 1))
def zc_values_and_grads(cfg, use_reference, params, x, cot):
    def loss(p, xx):
        y = zc_reference(cfg, p, xx, True)[0] if use_reference else \
            MoELayer(cfg).apply({"params": p}, xx, deterministic=False).y
        return jnp.sum(y * cot), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


@pytest.mark.parametrize("disp", list(ZC_DISPATCHES))
def test_zero_computation_experts_match_the_oracle(disp):
    cfg = zc_config(disp, num_shared_experts=1 if disp == "dropless_blocked" else 0)
    x, params = zc_init(cfg)
    cot = jax.random.normal(jax.random.key(9), x.shape)
    y, grads = zc_values_and_grads(cfg, False, params, x, cot)
    y_ref, grads_ref = zc_values_and_grads(cfg, True, params, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)
    for name in ("vector", "gate"):                                                 # constant experts are trained
        assert float(jnp.abs(grads[0]["zero_computation"][name]).max()) > 0
    _, routing = zc_reference(cfg, params, x, True)
    to_zc = np.asarray(routing.valid & (routing.expert_index >= E_FFN))
    assert 0 < to_zc.sum() < to_zc.size                                              # both kinds are used


def test_zero_computation_copies_never_reach_the_dispatch_buffers(monkeypatch):
    cfg = zc_config("capacity_einsum")
    x, params = zc_init(cfg)
    seen = {}
    real_call = dispatch.Capacity.__call__

    def spy(self, tokens, routing, experts):
        seen["routing"], seen["capacity"] = routing, self.capacity

        def counting_experts(buf, grouping):
            seen["buffer_shape"] = buf.shape
            return experts(buf, grouping)
        return real_call(self, tokens, routing, counting_experts)

    monkeypatch.setattr(dispatch.Capacity, "__call__", spy)
    stats = MoELayer(cfg).apply({"params": params}, x, deterministic=False).stats
    _, full = zc_reference(cfg, params, x, True)
    ffn = seen["routing"]
    assert ffn.num_experts == E_FFN and seen["buffer_shape"][0] == E_FFN
    # Exactly the copies sent to FFN experts are valid for dispatch; none of the others.
    np.testing.assert_array_equal(ffn.valid, full.valid & (full.expert_index < E_FFN))
    # The capacity is that of balanced routing over all 8 router outputs: ceil(0.75 * 24 * 2 / 8) = 5.
    assert seen["capacity"] == 5 == cfg.capacity(24, True)
    kept = reference.keep_mask(full, 5, "position") & (full.expert_index < E_FFN)
    n_zc = int((full.valid & (full.expert_index >= E_FFN)).sum())
    np.testing.assert_allclose(stats.experts_per_token, kept.sum() / 24, rtol=1e-6)
    np.testing.assert_allclose(stats.dropped_fraction, 1 - (kept.sum() + n_zc) / 48, rtol=1e-6)
    assert stats.expert_load.shape == (E_ALL,)
    np.testing.assert_allclose(stats.expert_load.sum(), 1.0, rtol=1e-6)
    counts = np.bincount(np.asarray(full.expert_index)[np.asarray(full.valid) & (np.asarray(full.expert_index) >= E_FFN)],
                         minlength=E_ALL)
    np.testing.assert_allclose(stats.expert_load[E_FFN:], counts[E_FFN:] / (kept.sum() + n_zc), rtol=1e-6)


def test_all_tokens_to_a_zero_expert_cost_nothing():
    cfg = MoEConfig(num_experts=4, hidden_dim=5, zero_experts=1, router=RouterConfig(k=1),
                    dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0))
    x = jax.random.normal(jax.random.key(0), (2, 6, D)).at[..., 0].set(3.0)
    params = unboxed_init(MoELayer(cfg), x)["params"]
    params["router"]["kernel"] = jnp.zeros((D, 5)).at[0, 4].set(10.0)            # expert 4 = the zero expert
    out = jitted(MoELayer(cfg))({"params": params}, x)
    y, stats = out.y, out.stats
    np.testing.assert_array_equal(y, np.zeros_like(x))
    assert float(stats.experts_per_token) == 0 and float(stats.dropped_fraction) == 0
    np.testing.assert_array_equal(stats.expert_load, [0, 0, 0, 0, 1])


def test_zero_copy_and_constant_experts_by_hand():
    # Token 0: zero expert (w 0.3) + copy expert (w 0.5) -> 0.5 x0. Token 1: constant expert 0 with w 1 and a
    # zero gate (a_1 = a_2 = 1/2) -> x1 / 2 + v_0 / 2. Token 2: constant expert 1, w 0.4, gate favouring v.
    x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    zc_index = jnp.array([[0, 1], [2, -1], [3, -1]])
    zc_weight = jnp.array([[0.3, 0.5], [1.0, 0.0], [0.4, 0.0]])
    v = jnp.array([[10.0, 20.0], [-4.0, 8.0]])
    gate = jnp.zeros((2, 2, 2)).at[1, :, 1].set(jnp.log(3.0))                       # x2 . gate = [0, log 3]
    y = ZeroComputationExperts(1, 1, 2).apply({"params": {"vector": v, "gate": gate}}, x, zc_index, zc_weight)
    np.testing.assert_allclose(y[0], 0.5 * x[0], rtol=1e-6)
    np.testing.assert_allclose(y[1], 0.5 * x[1] + 0.5 * v[0], rtol=1e-6)
    np.testing.assert_allclose(y[2], 0.4 * (0.25 * x[2] + 0.75 * v[1]), rtol=1e-6)


def test_split_routing_and_heterogeneous_load_balance():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    r = top_k_routing(logits, 2)                                                      # experts 2, 3 are zero-computation
    ffn, zc_index, zc_weight = split_routing(r, 2)
    np.testing.assert_array_equal(ffn.valid, [[True, True], [False, False]])
    np.testing.assert_array_equal(zc_index, [[-1, -1], [1, 0]])
    np.testing.assert_allclose(zc_weight, [[0, 0], [0.4, 0.3]], rtol=1e-6)
    # The layer's load-balance loss plug-in with MoE++'s per-output weights is the same function.
    for tau in (1.0, 0.5):
        eta = jnp.array([1.0, 1.0, tau, tau])
        np.testing.assert_allclose(LoadBalance().value(loss_inputs(r, logits, eta)),
                                   heterogeneous_load_balance(r, 2, tau), rtol=1e-6)
    # f = [1/4, 1/4, 1/4, 1/4]; P = [0.3, 0.225, 0.225, 0.25]; E * sum eta f P with eta = [1, 1, tau, tau].
    np.testing.assert_allclose(heterogeneous_load_balance(r, 2, 1.0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(heterogeneous_load_balance(r, 2, 0.5), 0.525 + 0.5 * 0.475, rtol=1e-6)


# ------------------------------------------------------------------------------------------- Chain-of-Experts


def chain_config(iterations, **kw):
    return MoEConfig(num_experts=6, hidden_dim=5, layer="chain", chain_iterations=iterations, num_shared_experts=1,
                     router=RouterConfig(k=2, renormalize=True, gating_residual=kw.pop("gating_residual", False)),
                     dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0), **kw)


def test_chain_with_one_iteration_is_the_plain_moe_layer():
    cfg = chain_config(1)
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    params = unboxed_init(ChainOfExpertsLayer(cfg), x)["params"]
    out = jitted(ChainOfExpertsLayer(cfg), deterministic=False)({"params": params}, x)
    y, stats = out.y, out.stats
    plain = {"router": params["iteration_0"]["router"], "experts": params["experts"], "shared": params["shared"]}
    sparse = MoEConfig(**{**cfg.__dict__, "layer": "sparse", "chain_iterations": None})
    out = jitted(MoELayer(sparse), deterministic=False)({"params": plain}, x)
    y_ref, stats_ref = out.y, out.stats
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert_trees_close(stats, stats_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("iterations,gating_residual", [(2, False), (3, True)])
def test_chain_equals_an_explicit_loop_of_moe_layers(iterations, gating_residual):
    cfg = chain_config(iterations, gating_residual=gating_residual)
    sparse = MoEConfig(**{**cfg.__dict__, "layer": "sparse", "chain_iterations": None})
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    layer = ChainOfExpertsLayer(cfg)
    params = unboxed_init(layer, x)["params"]
    assert set(params) == {"experts", "shared", *(f"iteration_{i}" for i in range(iterations))}  # one expert set

    def loop(p, xx):
        h, logits, stats = xx, None, []
        for i in range(iterations):
            own = {"router": p[f"iteration_{i}"]["router"], "experts": p["experts"], "shared": p["shared"]}
            out = MoELayer(sparse).apply({"params": own}, h, LayerContext(router_logits=logits, deterministic=False))
            logits = out.logits
            h = h + out.y
            stats.append(out.stats)
        return h - xx, stats

    out = jitted(layer, deterministic=False)({"params": params}, x)
    y, stats = out.y, out.stats
    y_ref, per_iter = jax.jit(loop)(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in ("load_balance", "z_loss"):
        np.testing.assert_allclose(stats.losses[name], sum(s.losses[name] for s in per_iter), rtol=1e-6)
    np.testing.assert_allclose(stats.expert_load, sum(s.expert_load for s in per_iter) / iterations, rtol=1e-6)
    np.testing.assert_allclose(stats.experts_per_token, sum(s.experts_per_token for s in per_iter), rtol=1e-6)
    cot = jax.random.normal(jax.random.key(2), x.shape)
    g = jax.jit(jax.grad(lambda p: jnp.sum(cot * layer.apply({"params": p}, x, deterministic=False).y)))(params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(cot * loop(p, x)[0])))(params)
    assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # The iterations really differ: dropping the last one changes the output.
    last = f"iteration_{iterations - 1}"
    shorter = jitted(ChainOfExpertsLayer(chain_config(iterations - 1, gating_residual=gating_residual)),
                     deterministic=False)
    assert not np.allclose(y, shorter({"params": {k: v for k, v in params.items() if k != last}}, x).y)


# ------------------------------------------------------------------------------------ config and model plumbing


@pytest.mark.parametrize("kwargs,message", [
    ({"layer": "dense"}, "layer='dense'"),
    ({"soft_slots": 2}, "soft_slots=2: applies to layer='soft'"),
    ({"layer": "soft", "soft_slots": 0}, "soft_slots=0"),
    ({"layer": "smear", "smear_granularity": "batch"}, "smear_granularity='batch'"),
    ({"layer": "chain", "chain_iterations": 0}, "chain_iterations=0"),
    ({"chain_iterations": 2}, "chain_iterations=2: applies to layer='chain'"),
    ({"layer": "soft", "router": RouterConfig(kind="hash")}, "router.kind='hash'"),
    ({"layer": "smear", "num_shared_experts": 1}, "num_shared_experts=1"),
    ({"zero_experts": -1}, "zero_experts=-1"),
    ({"copy_experts": 1, "layer": "soft"}, "copy_experts=1: zero-computation experts need layer"),
    ({"constant_experts": 1, "router": RouterConfig(kind="expert_choice")}, "constant_experts=1: zero-computation"),
    ({"zero_computation_tau": 0.5}, "zero_computation_tau=0.5: needs zero-computation experts"),
    ({"num_experts": 2, "zero_experts": 1, "router": RouterConfig(k=4)}, "router.k=4: must be <= num_routed"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MoEConfig(**{"num_experts": 4, "hidden_dim": 8, **kwargs})


def test_from_dict_and_layer_selection():
    cfg = MoEConfig.from_dict({"num_experts": 4, "hidden_dim": 8, "layer": "chain", "chain_iterations": 3,
                               "router": {"k": 1}})
    assert cfg.resolved_chain_iterations == 3 and cfg.num_routed == 4
    with pytest.raises(ValueError, match="soft_slot: unknown field"):
        MoEConfig.from_dict({"layer": "soft", "soft_slot": 2})
    for layer, cls in [("sparse", MoELayer), ("soft", SoftMoELayer), ("smear", SMEARLayer),
                       ("chain", ChainOfExpertsLayer)]:
        spec = MoEConfig(num_experts=4, hidden_dim=8, layer=layer)
        assert type(make_layer(spec)) is cls
        assert type(make_ffn(spec, kind="mlp", activation="gelu", use_bias=True, dtype="float32",
                             param_dtype="float32", name="ffn")) is cls
    with pytest.raises(ValueError, match=r"model.layers\[1\].router.gating_residual"):
        MLPConfig(num_classes=3, layers=(MoEConfig(num_experts=4), MoEConfig(num_experts=8, router=RouterConfig(
            gating_residual=True))))


def captured(model, variables, x):
    """The outputs of every submodule's ``__call__`` in one (compiled) forward pass."""
    run = jax.jit(lambda v, xx: model.apply(v, xx, capture_intermediates=True, mutable=["intermediates"])[1])
    return run(variables, x)["intermediates"]


@pytest.mark.parametrize("gating_residual", [True, False])
def test_mlp_model_threads_layer_1_logits_into_layer_2(gating_residual):
    spec = MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2, gating_residual=gating_residual))
    model = build_model(MLPConfig(num_classes=3, d_model=D, layers=(spec, spec)))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    variables = unboxed_init(model, x)
    inter = captured(model, variables, x)
    logits_1 = inter["layer_0"]["__call__"][0].logits
    h_2 = inter["layer_1_norm"]["__call__"][0]
    logits_2 = inter["layer_1"]["__call__"][0].logits
    own = h_2 @ variables["params"]["layer_1"]["router"]["kernel"]
    np.testing.assert_allclose(logits_2, own + logits_1 if gating_residual else own, rtol=1e-5, atol=1e-6)


def test_transformer_threads_logits_between_moe_blocks():
    from moejax.models.config import LMConfig
    spec = MoEConfig(num_experts=4, hidden_dim=8, layer="chain", chain_iterations=2,
                     router=RouterConfig(k=1, gating_residual=True))
    model = build_model(LMConfig(vocab_size=11, d_model=8, num_layers=2, num_heads=2, moe=spec))
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
    variables = unboxed_init(model, tokens)
    inter = captured(model, variables, tokens)["decoder"]
    block_0_logits = inter["block_0"]["ffn"]["__call__"][0].logits
    first_of_block_1 = inter["block_1"]["ffn"]["iteration_0"]["__call__"][0].logits
    h = inter["block_1"]["ffn_norm"]["__call__"][0]
    kernel = variables["params"]["decoder"]["block_1"]["ffn"]["iteration_0"]["router"]["kernel"]
    np.testing.assert_allclose(first_of_block_1, h @ kernel + block_0_logits, rtol=1e-5, atol=1e-5)
