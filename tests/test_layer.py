"""The MoE layer against the oracle: every router x every dispatch mode, values and gradients (fp32)."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import DenseLayer, DispatchConfig, MoEConfig, MoELayer, RouterConfig, reference
from moejax.routing import Router
from trees import assert_trees_close

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

ROUTERS = {
    "switch_top1": RouterConfig(k=1),
    "gshard_top2": RouterConfig(k=2),
    "mixtral_renorm": RouterConfig(k=2, renormalize=True),
    "deepseek_v3": RouterConfig(k=2, score="sigmoid", renormalize=True, routed_scaling=2.5, selection_bias=True,
                                num_groups=4, top_groups=2, group_score="top2_sum"),
    "group_limited": RouterConfig(k=3, num_groups=4, top_groups=2),
    "expert_choice": RouterConfig(kind="expert_choice", k=2),
    "top_p": RouterConfig(kind="top_p", top_p=0.6, k=4),
    "hash_top2": RouterConfig(kind="hash", k=2, seed=3),
}
# Sinkhorn, BASE, sparse OT, the attention router and threshold routing produce ordinary Routings too; their oracle
# checks (values and gradients, training mode) are in tests/test_mech_routing.py, one dispatch mode each, since
# dispatch does not depend on how a Routing was made.
# Routers whose combine weights are constants: the output gives their (absent) router no gradient.
FIXED_ROUTERS = {"hash_top2"}
DISPATCHES = {
    "capacity_einsum": DispatchConfig(mode="capacity", capacity_impl="einsum", capacity_factor=0.75),
    "capacity_index_score": DispatchConfig(mode="capacity", capacity_impl="index", capacity_factor=0.75,
                                           priority="score"),
    "capacity_unlimited": DispatchConfig(mode="capacity", capacity_impl="index", capacity_factor=None),
    "dropless_blocked": DispatchConfig(mode="dropless", gmm="blocked", gmm_tile=8),
    "dropless_ragged_dot": DispatchConfig(mode="dropless", gmm="ragged_dot"),
    # The CPU default: M/E-row slabs plus tile-2 overflow blocks (every gmm is also checked alone in test_dispatch).
    "dropless_bulk": DispatchConfig(mode="dropless", gmm="bulk", gmm_tile=2),
}
# Pallas kernels run in the (slow) interpreter on CPU: one router each, not the whole matrix.
INTERPRETED_DISPATCHES = {
    "dropless_pallas_triton": DispatchConfig(mode="dropless", gmm="pallas_triton", gmm_tile=16),
}
GLU_ROUTERS = {"mixtral_renorm", "deepseek_v3", "expert_choice"}
E, D, F = 8, 6, 5
X_SHAPE = (2, 12, D)        # T = 24 tokens


def make_config(router: str, disp: str, **kw) -> MoEConfig:
    glu = router in GLU_ROUTERS
    return MoEConfig(num_experts=E, hidden_dim=F, expert_kind="glu" if glu else "mlp",
                     activation="silu" if glu else "gelu", use_bias=not glu, router=ROUTERS[router],
                     dispatch={**DISPATCHES, **INTERPRETED_DISPATCHES}[disp], **kw)


def init(cfg: MoEConfig, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), X_SHAPE)
    variables = nn.unbox(MoELayer(cfg).init(jax.random.key(seed + 1), x))
    # Larger router weights than the init, so that routing is decisive and capacity actually binds.
    params = jax.tree_util.tree_map(lambda p: p, variables["params"])
    if "router" in params:
        params["router"]["kernel"] = jax.random.normal(jax.random.key(seed + 2), (D, E))
    state = {k: v for k, v in variables.items() if k != "params"}
    if "moe_state" in state:
        state = {"moe_state": {"router": {"selection_bias": 0.2 * jax.random.normal(jax.random.key(seed + 3), (E,))}}}
    return x, params, state


def reference_forward(cfg: MoEConfig, params, state, x, train: bool):
    tokens = x.reshape(-1, D)
    cap = cfg.capacity(tokens.shape[0], train)
    router_vars = {"params": params.get("router", {})}
    if state:
        router_vars["moe_state"] = state["moe_state"]["router"]
    routing = Router(E, cfg.router).apply(router_vars, tokens, capacity=cap)
    y = reference.moe(tokens, routing, params["experts"], kind=cfg.expert_kind, activation=cfg.activation,
                      capacity=cap if cfg.dispatch.mode == "capacity" else None, priority=cfg.dispatch.priority)
    if cfg.num_shared_experts:
        gate = params["shared_gate"]["kernel"] if cfg.shared_gate else None
        y = y + reference.shared_ffn(tokens, params["shared"], kind=cfg.expert_kind, activation=cfg.activation,
                                     gate=gate)
    return y.reshape(x.shape), routing


def layer_forward(cfg: MoEConfig, params, state, x, train: bool):
    return MoELayer(cfg).apply({"params": params, **state}, x, deterministic=not train)


@functools.partial(jax.jit, static_argnums=(0, 1))
def values_and_grads(cfg: MoEConfig, use_reference: bool, params, state, x, cot):
    def loss(p, xx):
        if use_reference:
            y = reference_forward(cfg, p, state, xx, train=True)[0]
        else:
            y = layer_forward(cfg, p, state, xx, train=True).y
        return jnp.sum(y * cot), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


@pytest.mark.parametrize("disp", list(DISPATCHES))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_layer_matches_reference(router, disp):
    cfg = make_config(router, disp)
    x, params, state = init(cfg)
    cot = jax.random.normal(jax.random.key(9), X_SHAPE)
    y, grads = values_and_grads(cfg, False, params, state, x, cot)
    y_ref, grads_ref = values_and_grads(cfg, True, params, state, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)
    # The router gets a gradient through the combine weights.
    if router not in FIXED_ROUTERS:
        assert float(jnp.abs(grads[0]["router"]["kernel"]).max()) > 0


@pytest.mark.parametrize("disp", list(INTERPRETED_DISPATCHES))
def test_layer_with_an_interpreted_kernel_matches_reference(disp):
    test_layer_matches_reference("mixtral_renorm", disp)      # GLU experts: three grouped matmuls per layer


@pytest.mark.parametrize("disp", ["capacity_einsum", "capacity_index_score"])
def test_capacity_binds_and_stats_match_the_oracle(disp):
    cfg = make_config("gshard_top2", disp)
    x, params, state = init(cfg)
    stats = layer_forward(cfg, params, state, x, train=True).stats
    _, routing = reference_forward(cfg, params, state, x, train=True)
    kept = reference.keep_mask(routing, cfg.capacity(24, True), cfg.dispatch.priority)
    assert 0 < float(stats.dropped_fraction) < 1
    np.testing.assert_allclose(stats.dropped_fraction, 1 - kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats.expert_load.sum(), 1.0, rtol=1e-6)
    assert float(stats.capacity) == cfg.capacity(24, True)
    np.testing.assert_allclose(stats.experts_per_token, kept.sum() / 24, rtol=1e-6)


def test_eval_uses_eval_capacity_factor():
    cfg = make_config("gshard_top2", "capacity_einsum")
    cfg = MoEConfig(**{**cfg.__dict__, "dispatch": DispatchConfig(mode="capacity", capacity_factor=0.5,
                                                                  eval_capacity_factor=None)})
    x, params, state = init(cfg)
    train_stats = layer_forward(cfg, params, state, x, train=True).stats
    eval_stats = layer_forward(cfg, params, state, x, train=False).stats
    assert float(train_stats.dropped_fraction) > 0 and float(eval_stats.dropped_fraction) == 0


@pytest.mark.parametrize("disp", ["capacity_einsum", "capacity_unlimited", "dropless_blocked"])
def test_all_experts_without_capacity_limit_is_the_dense_mixture(disp):
    router = RouterConfig(k=E)
    base = DISPATCHES[disp]
    dispatch = DispatchConfig(**{**base.__dict__, "capacity_factor": None})
    cfg = MoEConfig(num_experts=E, hidden_dim=F, router=router, dispatch=dispatch)
    x, params, state = init(cfg)
    y = layer_forward(cfg, params, state, x, train=True).y
    tokens = x.reshape(-1, D)
    probs = jax.nn.softmax(tokens @ params["router"]["kernel"], axis=-1)
    want = reference.dense_mixture(tokens, probs, params["experts"], kind="mlp", activation="gelu")
    np.testing.assert_allclose(y.reshape(-1, D), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("disp", list(DISPATCHES))
def test_unchosen_experts_get_exactly_zero_gradient(disp):
    cfg = make_config("gshard_top2", disp)
    x, params, state = init(cfg)
    # The last input feature is a constant 1 whose router weights push experts 0 and 5 out of every top-2.
    x = x.at[..., -1].set(1.0)
    params["router"]["kernel"] = params["router"]["kernel"].at[-1].set(jnp.zeros(E).at[jnp.array([0, 5])].set(-1e4))
    cot = jax.random.normal(jax.random.key(9), X_SHAPE)
    _, (grads, _) = values_and_grads(cfg, False, params, state, x, cot)
    for name, g in grads["experts"].items():
        np.testing.assert_array_equal(g[0], 0.0, err_msg=name)
        np.testing.assert_array_equal(g[5], 0.0, err_msg=name)
        assert float(jnp.abs(g[1:5]).max()) > 0, name


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("disp", ["capacity_einsum", "dropless_blocked"])
def test_shared_experts(disp, gate):
    cfg = make_config("mixtral_renorm", disp, num_shared_experts=2, shared_hidden_dim=3, shared_gate=gate)
    x, params, state = init(cfg)
    assert params["shared"]["w_gate"].shape == (D, 6)
    assert ("shared_gate" in params) == gate
    cot = jax.random.normal(jax.random.key(9), X_SHAPE)
    y, grads = values_and_grads(cfg, False, params, state, x, cot)
    y_ref, grads_ref = values_and_grads(cfg, True, params, state, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)


def test_fine_grained_experts_are_more_narrower_experts():
    cfg = MoEConfig(num_experts=32, hidden_dim=2, router=RouterConfig(k=8), dispatch=DispatchConfig(gmm="blocked"))
    x = jax.random.normal(jax.random.key(0), X_SHAPE)
    v = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))
    assert v["params"]["experts"]["w_in"].shape == (32, D, 2)
    out = MoELayer(cfg).apply(v, x)
    y, stats = out.y, out.stats
    routing = Router(32, cfg.router).apply({"params": v["params"]["router"]}, x.reshape(-1, D))
    want = reference.moe(x.reshape(-1, D), routing, v["params"]["experts"], kind="mlp", activation="gelu")
    np.testing.assert_allclose(y.reshape(-1, D), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(stats.experts_per_token, 8.0)


def test_parameters_carry_logical_axis_names():
    cfg = make_config("gshard_top2", "dropless_blocked", num_shared_experts=1)
    boxed = MoELayer(cfg).init(jax.random.key(0), jnp.ones(X_SHAPE))["params"]
    assert boxed["router"]["kernel"].names == ("embed", "expert")
    assert boxed["experts"]["w_in"].names == ("expert", "embed", "mlp")
    assert boxed["experts"]["w_out"].names == ("expert", "mlp", "embed")
    assert boxed["experts"]["b_in"].names == ("expert", "mlp")
    assert boxed["shared"]["w_in"].names == ("embed", "mlp")


def test_dense_layer_has_the_same_interface():
    cfg = make_config("gshard_top2", "dropless_blocked", num_shared_experts=1)
    dense = DenseLayer.matching_active(cfg)
    assert dense.hidden_dim == 2 * F + F
    x = jax.random.normal(jax.random.key(0), X_SHAPE)
    v = nn.unbox(dense.init(jax.random.key(1), x))
    out = dense.apply(v, x, deterministic=False)
    y, stats = out.y, out.stats
    want = reference.expert_forward(v["params"], x, kind="mlp", activation="gelu")
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert float(stats.dropped_fraction) == 0 and stats.expert_load.shape == (1,)


def test_bfloat16_layer_runs_and_is_close_to_float32():
    cfg32 = make_config("mixtral_renorm", "dropless_blocked")
    cfg16 = MoEConfig(**{**cfg32.__dict__, "dtype": "bfloat16"})
    x, params, state = init(cfg32)
    y32 = layer_forward(cfg32, params, state, x, train=False).y
    y16 = layer_forward(cfg16, params, state, x.astype(jnp.bfloat16), train=False).y
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


def test_rejects_one_dimensional_input():
    cfg = make_config("gshard_top2", "dropless_blocked")
    with pytest.raises(ValueError, match="x: expected"):
        MoELayer(cfg).init(jax.random.key(0), jnp.ones((D,)))


# Routing mechanisms that are random in training: in evaluation they must be plain routing.
NOISY_ROUTERS = {
    "gumbel_top2": RouterConfig(k=2, gumbel_noise=1.0),
    "gate_dropout_top2": RouterConfig(k=2, renormalize=True, gate_dropout=0.5),
    "gumbel_top_p": RouterConfig(kind="top_p", top_p=0.6, k=4, gumbel_noise=0.5),
    "jitter_top1": RouterConfig(k=1, jitter_noise=0.1),
}


def noisy_config(router: str, disp: str) -> MoEConfig:
    return MoEConfig(num_experts=E, hidden_dim=F, router=NOISY_ROUTERS[router], dispatch=DISPATCHES[disp])


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_values_and_grads(cfg: MoEConfig, use_reference: bool, params, x, cot):
    def loss(p, xx):
        if use_reference:
            y = reference_forward(cfg, p, {}, xx, train=False)[0]
        else:
            y = layer_forward(cfg, p, {}, xx, train=False).y
        return jnp.sum(y * cot), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


# One dispatch each keeps the suite fast: the dispatch x router matrix above already covers the plain routers.
@pytest.mark.parametrize("router,disp", [("gumbel_top2", "capacity_index_score"), ("gate_dropout_top2", "dropless_blocked"),
                                         ("gumbel_top_p", "dropless_blocked"), ("jitter_top1", "capacity_einsum")])
def test_noise_variants_in_eval_match_reference(router, disp):
    cfg = noisy_config(router, disp)
    x, params, _ = init(cfg)
    cot = jax.random.normal(jax.random.key(9), X_SHAPE)
    y, grads = eval_values_and_grads(cfg, False, params, x, cot)
    y_ref, grads_ref = eval_values_and_grads(cfg, True, params, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)
    # Noise off in evaluation: the same as the router without the noise options.
    plain = MoEConfig(**{**cfg.__dict__, "router": RouterConfig(**{**cfg.router.__dict__, "gumbel_noise": 0.0,
                                                                      "gate_dropout": 0.0, "jitter_noise": 0.0})})
    y_plain, _ = eval_values_and_grads(plain, False, params, x, cot)
    np.testing.assert_array_equal(y, y_plain)


def captured_routing(cfg: MoEConfig, params, x, rng, train: bool):
    """The layer's own routing decision (with its RNG draws), captured from the router's output."""
    _, inter = MoELayer(cfg).apply({"params": params}, x, deterministic=not train, rngs={"jitter": rng},
                                   capture_intermediates=True, mutable=["intermediates"])
    return inter["intermediates"]["router"]["__call__"][0][0]


STOCHASTIC = {
    "random_top1": RouterConfig(kind="random", k=1),
    "random_top2": RouterConfig(kind="random", k=2),
    "gumbel_top2": RouterConfig(k=2, gumbel_noise=1.0),
    "gate_dropout_top2": RouterConfig(k=2, gate_dropout=0.5),
}


@pytest.mark.parametrize("router,disp", [("random_top1", "capacity_einsum"), ("random_top2", "dropless_blocked"),
                                         ("gumbel_top2", "dropless_blocked"), ("gate_dropout_top2", "capacity_einsum")])
def test_stochastic_routing_in_training_matches_reference(router, disp):
    """Given the layer's random draws, the layer is the oracle, in values and gradients.

    The oracle's routing keeps the drawn selection (experts and kept slots) and recomputes the weights
    from the router parameters as each mechanism specifies, so the router gradient is checked too.
    """
    cfg = MoEConfig(num_experts=E, hidden_dim=F, router=STOCHASTIC[router], dispatch=DISPATCHES[disp])
    x, params, _ = init(cfg)
    rng = jax.random.key(17)
    drawn = captured_routing(cfg, params, x, rng, train=True)
    cot = jax.random.normal(jax.random.key(9), X_SHAPE)
    tokens_shape = (-1, D)

    def layer_loss(p, xx):
        y = MoELayer(cfg).apply({"params": p}, xx, deterministic=False, rngs={"jitter": rng}).y
        return jnp.sum(y * cot), y

    def reference_loss(p, xx):
        tokens = xx.reshape(tokens_shape)
        routing = drawn
        if "router" in p:
            probs = jax.nn.softmax(tokens @ p["router"]["kernel"], axis=-1)
            w = jnp.take_along_axis(probs, drawn.expert_index, axis=-1) / (1.0 - cfg.router.gate_dropout)
            routing = drawn.replace(weight=jnp.where(drawn.valid, w, 0.0))
        cap = cfg.capacity(tokens.shape[0], True) if cfg.dispatch.mode == "capacity" else None
        y = reference.moe(tokens, routing, p["experts"], kind="mlp", activation="gelu", capacity=cap)
        return jnp.sum(y.reshape(xx.shape) * cot), y.reshape(xx.shape)

    (_, y), grads = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(params, x)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True))(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    assert_trees_close(grads, grads_ref)
    # A different key draws a different routing.
    other = captured_routing(cfg, params, x, jax.random.key(18), train=True)
    assert not (np.array_equal(other.expert_index, drawn.expert_index) and np.array_equal(other.valid, drawn.valid))


def test_layer_rejects_non_floating_input_and_groups_by_size_equal_groups_by_count():
    cfg = MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2),
                    dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0, groups=2))
    x = jax.random.normal(jax.random.key(0), (2, 8, 5))
    v = nn.unbox(jax.jit(MoELayer(cfg).init)(jax.random.key(1), x))
    with pytest.raises(ValueError, match=r"^x: expected a floating dtype, got int32"):
        MoELayer(cfg).apply(v, x.astype(jnp.int32))
    by_size = dataclasses.replace(cfg, dispatch=dataclasses.replace(cfg.dispatch, groups=1, group_size=8))
    run = jax.jit(lambda c, vv, xx: MoELayer(c).apply(vv, xx, deterministic=False).y, static_argnums=0)
    np.testing.assert_array_equal(run(by_size, v, x), run(cfg, v, x))


def test_an_empty_token_batch_returns_an_empty_output():
    cfg = MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2), dispatch=DispatchConfig(mode="dropless"))
    v = jax.eval_shape(lambda: nn.unbox(MoELayer(cfg).init(jax.random.key(1), jnp.ones((2, 3, 5)))))
    out = MoELayer(cfg).apply(jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), v), jnp.ones((0, 3, 5)))
    assert out.y.shape == (0, 3, 5) and out.logits.shape == (0, 3, 4) and out.stats.expert_load.shape == (4,)
    assert float(out.stats.experts_per_token) == 0.0
